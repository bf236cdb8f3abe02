//! powerinfer-daemon: the engine as a service — model files, and (as they arrive) model
//! loading, placement, the actors, the gRPC service, telemetry and configuration — plus
//! the `powerinferd` binary's commands.
//!
//! Depends on `powerinfer-ops` for every number it computes; it owns no kernels.

pub mod bench;
pub mod bench_serving;
pub mod cli;
pub mod device;
pub mod engine;
pub mod generate;
pub mod generation;
pub mod ids;
pub mod inspect;
pub mod model;
pub mod models;
pub mod perplexity;
pub mod prepare;
pub mod progress;
pub mod sampler;
pub mod server;
pub mod settings;
pub mod tokenizer;
