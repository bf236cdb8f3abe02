//! Our dequantization of every block type equals llama.cpp's gguf-py (an independent
//! implementation of the GGML formats) on the fixture `quant_blocks.gguf`: blocks made by
//! our quantizers and blocks of random bits. See `fixtures/dequantize_reference.py`.

use std::path::PathBuf;

use half::{bf16, f16};
use powerinfer_ops::GgmlType;
use powerinfer_ops::gguf::{GgufFile, TensorInfo};
use powerinfer_ops::quant::*;

fn fixture(name: &str) -> GgufFile {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name);
    GgufFile::open(&p).unwrap()
}

fn ours<B: Block>(file: &GgufFile, t: &TensorInfo) -> Vec<f32> {
    let blocks = file.tensor_data::<B>(t).unwrap();
    let mut out = vec![0.0; blocks.len() * B::LEN];
    B::dequantize(blocks, &mut out);
    out
}

#[test]
fn dequantization_matches_gguf_py_for_every_type() {
    let input = fixture("quant_blocks.gguf");
    let expected = fixture("quant_blocks.expected.gguf");
    let mut seen = std::collections::HashSet::new();
    for t in input.tensors() {
        let got = match t.dtype {
            GgmlType::F32 => ours::<f32>(&input, t),
            GgmlType::F16 => ours::<f16>(&input, t),
            GgmlType::BF16 => ours::<bf16>(&input, t),
            GgmlType::Q4_0 => ours::<BlockQ4_0>(&input, t),
            GgmlType::Q4_1 => ours::<BlockQ4_1>(&input, t),
            GgmlType::Q5_0 => ours::<BlockQ5_0>(&input, t),
            GgmlType::Q5_1 => ours::<BlockQ5_1>(&input, t),
            GgmlType::Q8_0 => ours::<BlockQ8_0>(&input, t),
            GgmlType::Q4_K => ours::<BlockQ4K>(&input, t),
            GgmlType::Q5_K => ours::<BlockQ5K>(&input, t),
            GgmlType::Q6_K => ours::<BlockQ6K>(&input, t),
            GgmlType::Q2_K => ours::<BlockQ2K>(&input, t),
            GgmlType::Q3_K => ours::<BlockQ3K>(&input, t),
            GgmlType::IQ4_NL => ours::<BlockIQ4NL>(&input, t),
            GgmlType::IQ4_XS => ours::<BlockIQ4XS>(&input, t),
            other => panic!("unexpected type {other}"),
        };
        seen.insert(t.dtype);
        let want = expected.tensor_data_by_name::<f32>(&t.name).unwrap();
        assert_eq!(got.len(), want.len(), "{}", t.name);
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            // Same formula in f32 on both sides; numpy may fuse or order one product
            // differently, so allow a couple of ulps.
            let tol = 2.0 * f32::EPSILON * w.abs().max(1e-30);
            assert!(
                (g - w).abs() <= tol,
                "{} [{i}]: ours {g}, gguf-py {w}",
                t.name
            );
        }
    }
    for wt in WeightType::ALL {
        assert!(seen.contains(&wt.ggml()), "fixture lacks {wt:?}");
    }
}

#[test]
fn block_sizes_match_gguf_py() {
    // (type id, block length, block bytes) as gguf-py's GGML_QUANT_SIZES lists them, but
    // for Q8_1: gguf-py still lists its old f32 layout (40 bytes); ggml's `block_q8_1` is
    // two f16 and 32 bytes (36), which is what the kernels use. Q8_1 never occurs in files.
    const GGUF_PY: &[(u32, usize, usize)] = &[
        (0, 1, 4),
        (1, 1, 2),
        (2, 32, 18),
        (3, 32, 20),
        (6, 32, 22),
        (7, 32, 24),
        (8, 32, 34),
        (9, 32, 36),
        (10, 256, 84),
        (11, 256, 110),
        (12, 256, 144),
        (13, 256, 176),
        (14, 256, 210),
        (15, 256, 292),
        (16, 256, 66),
        (17, 256, 74),
        (18, 256, 98),
        (19, 256, 50),
        (20, 32, 18),
        (21, 256, 110),
        (22, 256, 82),
        (23, 256, 136),
        (24, 1, 1),
        (25, 1, 2),
        (26, 1, 4),
        (27, 1, 8),
        (28, 1, 8),
        (29, 256, 56),
        (30, 1, 2),
        (34, 256, 54),
        (35, 256, 66),
        (39, 32, 17),
        (40, 64, 36),
        (41, 128, 18),
    ];
    for &(id, len, bytes) in GGUF_PY {
        let t = GgmlType::from_id(id).unwrap();
        assert_eq!((t.block_len(), t.block_bytes()), (len, bytes), "{t}");
    }
}
