//! The AMD GPU device of powerinfer-rs (`--device hip:N`, DESIGN.md §3): the kernel
//! sources of `powerinfer-kernels-cuda` — one source, not a copy: `kernels/compat.cuh`
//! maps the runtime's names, and the wave size is the compile-time `PI_WARP` — compiled
//! at run time by hiprtc for the GPU's architecture, on the same
//! [`powerinfer_kernels_cuda::KernelDevice`] as the CUDA backend.
//!
//! The HIP backend is the `hip` feature ([`hip`]); it links libamdhip64, so it builds
//! where ROCm (or Debian's `libamdhip64-dev`) is installed. The CPU execution harness of
//! the CUDA crate runs the kernels at wave 32 (RDNA, and CUDA) and wave 64 (CDNA, GCN) on
//! every machine.

/// The architectures CI compiles every kernel for, with their wave size: CDNA2 (MI200,
/// wave 64) and RDNA2 (RX 6000, wave 32). ROCm 5.2's compiler predates gfx942 and gfx11.
pub const CHECKED_TARGETS: [(&str, u32); 2] = [("gfx90a", 64), ("gfx1030", 32)];

/// The wave size the kernels are built with for `arch` (`gfx90a`, or a full target id
/// such as `gfx90a:sramecc+:xnack-`): 32 on RDNA (gfx10, gfx11, gfx12), 64 on GCN and
/// CDNA (gfx9 and older). A device's own report, where there is one, decides instead.
pub fn default_wave(arch: &str) -> u32 {
    let digits = arch.trim_start_matches("gfx");
    let major: String = digits.chars().take_while(char::is_ascii_digit).collect();
    // gfx9xx and older: three characters (the last may be a letter); gfx10xx and later:
    // four digits.
    if major.len() >= 4 { 32 } else { 64 }
}

#[cfg(feature = "hip")]
pub mod hip;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wave_sizes_follow_the_architecture_family() {
        for (arch, wave) in [
            ("gfx90a", 64),
            ("gfx90a:sramecc+:xnack-", 64),
            ("gfx906", 64),
            ("gfx942", 64),
            ("gfx1030", 32),
            ("gfx1100", 32),
            ("gfx1201", 32),
        ] {
            assert_eq!(default_wave(arch), wave, "{arch}");
        }
        for (arch, wave) in CHECKED_TARGETS {
            assert_eq!(default_wave(arch), wave, "{arch}");
        }
    }
}
