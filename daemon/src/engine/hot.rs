//! The hot executor: owns the device and the weights placed on it (attention of placed
//! layers, hot neurons). Without a device its placement is empty and it only reports.

use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use powerinfer_ops::device::{Device, DeviceInfo};

use super::types::{EngineError, EngineOptions};

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
    /// Opens the device on thread `pi-hot` and returns once it is open (or failed).
    pub fn spawn(opts: &EngineOptions) -> Result<Self, EngineError> {
        let (tx, rx) = sync_channel(INBOX);
        let (ready_tx, ready_rx) = sync_channel::<Result<(), EngineError>>(1);
        let (spec, budget) = (opts.device.clone(), opts.vram_budget);
        std::thread::Builder::new()
            .name("pi-hot".into())
            .spawn(move || match crate::device::open(&spec, budget) {
                Ok(device) => {
                    let _ = ready_tx.send(Ok(()));
                    HotExecutor { device, rx }.run();
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(EngineError::Device(e)));
                }
            })
            .map_err(|e| EngineError::Internal(format!("cannot start the hot executor: {e}")))?;
        ready_rx.recv().map_err(|_| EngineError::Stopped)??;
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
