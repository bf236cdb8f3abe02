//! The kernel sources, as one translation unit for the run-time compilers (NVRTC, hiprtc):
//! the headers inlined in order, so no include path is needed.

use sha2::{Digest, Sha256};

const COMPAT: &str = include_str!("../kernels/compat.cuh");
const QUANT: &str = include_str!("../kernels/quant.cuh");
const KERNELS: &str = include_str!("../kernels/kernels.cu");

/// Every kernel of the source, by its name in the compiled module.
pub const KERNEL_NAMES: [&str; 12] = [
    "pi_matmul",
    "pi_ffn_gate_up",
    "pi_axpy_rows",
    "pi_sum_splits",
    "pi_rms_norm",
    "pi_rope",
    "pi_kv_write",
    "pi_attention",
    "pi_bias_act",
    "pi_glu_elementwise",
    "pi_select",
    "pi_merge",
];

/// The whole source with `warp` lanes per warp.
pub fn kernel_source(warp: u32) -> String {
    let mut out = format!("#define PI_WARP {warp}\n");
    for part in [COMPAT, QUANT, KERNELS] {
        for line in part.lines() {
            let l = line.trim_start();
            if l.starts_with("#include \"") || l.starts_with("#pragma once") {
                continue;
            }
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// A hex digest of the source, for the compiled-module cache's keys.
pub fn source_hash(source: &str) -> String {
    Sha256::digest(source.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_lists_every_kernel_and_inlines_its_headers() {
        let s = kernel_source(32);
        assert!(!s.contains("#include \""));
        for name in KERNEL_NAMES {
            assert!(s.contains(&format!("PI_GLOBAL void {name}(")), "{name}");
            assert!(
                s.contains(&format!("X({name})")),
                "{name} in PI_KERNEL_LIST"
            );
        }
        assert_eq!(s.matches("PI_GLOBAL void ").count(), KERNEL_NAMES.len());
    }
}
