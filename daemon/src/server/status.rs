//! The one mapping from the daemon's errors to gRPC status codes.

use powerinfer_ops::gguf::GgufError;
use tonic::{Code, Status};

use crate::device::DeviceOpenError;
use crate::engine::EngineError;
use crate::model::LoadError;
use crate::store::ResolveError;

/// Why a request to the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    /// A malformed request (missing or contradictory fields).
    #[error("{0}")]
    InvalidArgument(String),
    /// The request names a path and the configuration does not allow paths.
    #[error("model {0:?} is a file path, and this server does not accept paths (allow_paths)")]
    PathRefused(String),
    #[error("model {0:?} is not loaded")]
    NotLoaded(String),
    /// The model is loaded with other settings than the request asks for.
    #[error("model {name:?} is already loaded with {setting} {current}; unload it first")]
    LoadedDifferently {
        name: String,
        setting: &'static str,
        current: String,
    },
    /// Loading the model would take the loaded models past the memory budget, and the
    /// models that could make room are busy (or none could).
    #[error(
        "model {model:?} needs {} of memory; the budget is {}, and {} of it is held by \
         models in use ({}); try again when they are idle, or unload one",
        gib(*need), gib(*budget), gib(*held), busy.join(", ")
    )]
    OverMemoryBudget {
        model: String,
        need: u64,
        budget: u64,
        held: u64,
        busy: Vec<String>,
    },
    /// The model alone is larger than the memory budget.
    #[error("model {model:?} needs {} of memory, more than the whole budget of {}", gib(*need), gib(*budget))]
    LargerThanBudget {
        model: String,
        need: u64,
        budget: u64,
    },
    /// The request's API key already has this many streams running.
    #[error(
        "this API key already has {limit} streams running (max_streams_per_key); wait for one to end"
    )]
    TooManyStreams { limit: usize },
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("{0}")]
    Internal(String),
}

/// Bytes as GiB with two decimals (and the exact count), for messages.
fn gib(bytes: u64) -> String {
    format!(
        "{:.2} GiB ({bytes} bytes)",
        bytes as f64 / (1u64 << 30) as f64
    )
}

impl ServerError {
    pub fn code(&self) -> Code {
        match self {
            Self::Engine(e) => match e {
                EngineError::InvalidArgument(_) | EngineError::PromptTooLong { .. } => {
                    Code::InvalidArgument
                }
                EngineError::QueueFull { .. } => Code::ResourceExhausted,
                EngineError::Load(LoadError::Gguf(GgufError::Io { .. })) => Code::Internal,
                // Asked for a backend this build or this machine lacks, or a device that
                // cannot hold the model.
                EngineError::Load(LoadError::Device(
                    DeviceOpenError::NotCompiled { .. } | DeviceOpenError::Failed { .. },
                )) => Code::FailedPrecondition,
                // A file that is not a model we can run is the caller's input.
                EngineError::Load(_) => Code::InvalidArgument,
                EngineError::Device(DeviceOpenError::Unknown(_)) => Code::InvalidArgument,
                // Asked for a backend this build or this machine lacks.
                EngineError::Device(
                    DeviceOpenError::NotCompiled { .. } | DeviceOpenError::Failed { .. },
                ) => Code::FailedPrecondition,
                EngineError::Stopped | EngineError::Failed(_) => Code::Unavailable,
                EngineError::Internal(_) => Code::Internal,
            },
            Self::Resolve(e) => match e {
                ResolveError::Unknown { .. } | ResolveError::MissingFile { .. } => Code::NotFound,
                ResolveError::Fetch { .. } => Code::Unavailable,
            },
            Self::InvalidArgument(_) | Self::PathRefused(_) => Code::InvalidArgument,
            Self::NotLoaded(_) => Code::NotFound,
            Self::LoadedDifferently { .. } => Code::FailedPrecondition,
            Self::OverMemoryBudget { .. } | Self::TooManyStreams { .. } => Code::ResourceExhausted,
            Self::LargerThanBudget { .. } => Code::FailedPrecondition,
            Self::ShuttingDown => Code::Unavailable,
            Self::Internal(_) => Code::Internal,
        }
    }
}

impl From<ServerError> for Status {
    fn from(e: ServerError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}

impl From<EngineError> for Status {
    fn from(e: EngineError) -> Self {
        ServerError::Engine(e).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        let s: Status = EngineError::QueueFull { max: 3 }.into();
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert!(s.message().contains('3'));
        let s: Status = ServerError::InvalidArgument("x".into()).into();
        assert_eq!(s.code(), Code::InvalidArgument);
        let s: Status = ServerError::NotLoaded("m".into()).into();
        assert_eq!(s.code(), Code::NotFound);
    }
}
