//! Wall time per stage of the forward pass, summed over passes (`bench` prints it when
//! profiling is on); off by default, when it costs nothing but a branch per stage.

use std::time::{Duration, Instant};

/// Stages of a forward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Embed,
    Norm,
    QkvProj,
    RopeKv,
    Attention,
    OutProj,
    GateUp,
    Activation,
    Down,
    Residual,
    Head,
    /// Waiting for another executor or the device (a hybrid step's hand-offs).
    Exchange,
}

impl Stage {
    pub const ALL: [Stage; 12] = [
        Self::Embed,
        Self::Norm,
        Self::QkvProj,
        Self::RopeKv,
        Self::Attention,
        Self::OutProj,
        Self::GateUp,
        Self::Activation,
        Self::Down,
        Self::Residual,
        Self::Head,
        Self::Exchange,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Embed => "embedding",
            Self::Norm => "rms_norm",
            Self::QkvProj => "q/k/v projections",
            Self::RopeKv => "rope + kv write",
            Self::Attention => "attention",
            Self::OutProj => "output projection",
            Self::GateUp => "ffn gate/up",
            Self::Activation => "ffn activation",
            Self::Down => "ffn down",
            Self::Residual => "residual adds",
            Self::Head => "norm + lm head",
            Self::Exchange => "device/executor exchange",
        }
    }
}

/// Time per stage; enabled, it costs two clock reads per stage.
#[derive(Default)]
pub struct Profile {
    enabled: bool,
    last: Option<Instant>,
    pub totals: [Duration; Stage::ALL.len()],
    pub passes: u64,
}

impl Profile {
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            ..Self::default()
        }
    }

    /// Starts a pass.
    pub fn start(&mut self) {
        if self.enabled {
            self.passes += 1;
            self.last = Some(Instant::now());
        }
    }

    /// Charges the time since the previous mark to `stage`.
    pub fn mark(&mut self, stage: Stage) {
        if let Some(last) = self.last {
            let now = Instant::now();
            self.totals[stage as usize] += now - last;
            self.last = Some(now);
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// `(stage, total)` for every stage that took time.
    pub fn report(&self) -> Vec<(Stage, Duration)> {
        Stage::ALL
            .iter()
            .map(|&s| (s, self.totals[s as usize]))
            .filter(|(_, d)| !d.is_zero())
            .collect()
    }
}
