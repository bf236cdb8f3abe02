//! The hot executor: owns the device and the weights placed on it (the hot neurons).
//! Without a device its placement is empty and it only reports. On the simulated device
//! the hot part of each hybrid layer runs on the device's own compute thread while the
//! cold executor's pool runs the rest of the layer (see `Model::apply_placement`).

use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use powerinfer_ops::device::{Device, DeviceInfo};

use super::types::EngineError;

/// Status requests waiting; the hot executor does no per-step work without a placement.
const INBOX: usize = 16;

pub(crate) enum HotMsg {
    Info {
        reply: tokio::sync::oneshot::Sender<HotInfo>,
    },
}

/// What the hot executor holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HotInfo {
    pub device: Option<DeviceInfo>,
    /// Weight bytes placed on the device.
    pub placed_bytes: u64,
}

struct HotExecutor {
    device: Option<Box<dyn Device>>,
    rx: Receiver<HotMsg>,
}

impl HotExecutor {
    fn run(self) {
        while let Ok(msg) = self.rx.recv() {
            match msg {
                HotMsg::Info { reply } => {
                    let _ = reply.send(HotInfo {
                        device: self.device.as_ref().map(|d| d.info()),
                        placed_bytes: self.device.as_ref().map_or(0, |d| d.info().memory_used),
                    });
                }
            }
        }
    }
}

#[derive(Clone)]
pub(crate) struct HotHandle {
    tx: SyncSender<HotMsg>,
}

impl HotHandle {
    /// Starts the executor on thread `pi-hot` with the device the model was placed on.
    pub fn spawn(device: Option<Box<dyn Device>>) -> Result<Self, EngineError> {
        let (tx, rx) = sync_channel(INBOX);
        std::thread::Builder::new()
            .name("pi-hot".into())
            .spawn(move || HotExecutor { device, rx }.run())
            .map_err(|e| EngineError::Internal(format!("cannot start the hot executor: {e}")))?;
        Ok(Self { tx })
    }

    pub async fn info(&self) -> Result<HotInfo, EngineError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx
            .try_send(HotMsg::Info { reply })
            .map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)
    }
}
