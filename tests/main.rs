//! The end-to-end tests, in one binary (one link step on a 2-core CI).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli_inspect;
mod cli_pull;
mod cli_run;
mod device_faults;
mod engine;
mod gemma3_modes;
mod gguf_hostile;
mod gguf_roundtrip;
mod http_api;
mod http_lifecycle;
mod hybrid;
mod parity_gemma3;
mod parity_model;
mod parity_tokenize;
mod placement;
mod planted_sparsity;
mod pretokenize;
mod quant_reference;
mod real_model;
mod server_api;
mod server_real;
mod sparsity;
mod synthetic_models;
mod synthetic_qwen;
mod telemetry;
