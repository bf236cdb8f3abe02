//! powerinfer-daemon: the engine as a service, and the `powerinferd` binary's commands.
//!
//! By concern:
//! - [`model`]: a model in memory — configuration, weights, the forward pass, sparsity,
//!   placement on a device and the hybrid step — and its one loading path
//!   ([`model::open`]);
//! - [`store`]: where model files live and how they get there (the models directory,
//!   catalog aliases, verified downloads);
//! - [`generation`]: one sequence's generation (sampler, text stream, finish) and the
//!   direct path that runs it without actors ([`generation::Session`]);
//! - [`engine`]: the actors of a loaded model (tokenizer, scheduler, cold and hot
//!   executors, predictor);
//! - [`server`]: the gRPC service, model management, health, telemetry and its
//!   configuration; [`settings`]: the environment's tuning, read once;
//! - [`tools`]: the offline tools (bench, perplexity, prepare, inspect);
//! - [`cli`]: argument parsing and the commands; [`device`]: the one place a device
//!   backend is chosen.
//!
//! Depends on `powerinfer-ops` for every number it computes; it owns no kernels and no
//! `unsafe`.

pub mod cli;
pub mod device;
pub mod engine;
pub mod generation;
pub mod ids;
pub mod model;
pub mod progress;
pub mod server;
pub mod settings;
pub mod store;
pub mod tokenizer;
pub mod tools;
