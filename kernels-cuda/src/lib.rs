//! The CUDA device of powerinfer-rs (DESIGN.md §3): the hot half of hybrid layers —
//! attention with its KV cache, the hot neurons, predictors, the head — on an NVIDIA GPU,
//! while the host computes the cold neurons.
//!
//! - `kernels/*.cu`: the kernels in portable CUDA C (one source for NVRTC, HIP and the
//!   host compiler), through the names of `kernels/compat.cuh`.
//! - [`KernelDevice`]: the [`powerinfer_ops::device::Device`] trait on those kernels over
//!   a [`Backend`] — the CUDA driver (cargo feature `cuda`), or
//!   [`harness::HarnessBackend`], which runs the same kernel sources on the CPU, so the
//!   kernels and the device logic are tested on machines without a GPU.

pub mod backend;
#[cfg(feature = "cuda")]
pub mod cuda;
mod device;
pub mod harness;
mod source;

pub use backend::{Arg, Backend, DevPtr, Dims, EventQueue, Slots, Staged};
pub use device::{KernelDevice, computes_with};
pub use source::{KERNEL_NAMES, kernel_source, source_hash};
