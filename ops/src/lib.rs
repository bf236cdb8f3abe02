//! powerinfer-ops: tensors, GGUF files, GGML quantized blocks and the CPU kernels (dense
//! and, later, neuron-sparse) that the engine computes with.
//!
//! This crate owns the numbers: file format, block layouts, kernels and the thread pool
//! they run on. It must not depend on anything async (tokio, tonic) or on any GPU toolkit;
//! GPU crates implement its device trait, never the other way round.

pub mod device;
pub mod dtype;
pub mod gguf;
pub mod matmul;
pub mod nn;
pub mod pod;
pub mod pool;
pub mod storage;
pub mod tensor;

pub use dtype::GgmlType;
pub mod quant;
pub mod rng;
pub mod simd;
pub mod sparse;
