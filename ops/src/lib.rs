//! powerinfer-ops: tensors, GGUF files, GGML quantized blocks, the CPU kernels (dense and
//! neuron-sparse) that the engine computes with, and the device seam.
//!
//! This crate owns the numbers: file format, block layouts, kernels, the thread pool they
//! run on, the layer pieces a forward pass is made of ([`transformer`]) and the trait an
//! accelerator implements to hold and run them ([`device`]), with a simulated device in
//! host memory. It must not depend on anything async (tokio, tonic) or on any GPU
//! toolkit; GPU crates implement its device trait, never the other way round.

pub mod device;
pub mod dtype;
pub mod gguf;
pub mod handoff;
pub mod ids;
pub mod kv;
pub mod matmul;
pub mod nn;
pub mod pod;
pub mod pool;
pub mod profile;
pub mod storage;
pub mod tensor;

pub use dtype::GgmlType;
pub mod quant;
pub mod rng;
pub mod simd;
pub mod sparse;
pub mod transformer;
