//! Writes `tests/fixtures/quant_blocks.gguf`: for every weight type, one tensor quantized
//! by our quantizers from seeded random values and one of random block bits (scales made
//! finite). `tests/fixtures/dequantize_reference.py` then dequantizes it with llama.cpp's
//! gguf-py into `quant_blocks.expected.gguf`, which the `quant_reference` test compares
//! our dequantization against. Run: `cargo run -p powerinfer-tests --example make_quant_fixture`.

use half::{bf16, f16};
use powerinfer_ops::GgmlType;
use powerinfer_ops::gguf::GgufWriter;
use powerinfer_ops::pod::{Pod, as_bytes, as_bytes_mut};
use powerinfer_ops::quant::*;
use powerinfer_ops::rng::Rng;

const N: usize = 512;

fn quantized<B: Block>(x: &[f32]) -> Vec<B> {
    let mut out = vec![B::default(); x.len() / B::LEN];
    B::quantize(x, &mut out);
    out
}

/// Random bits in every byte, then `fix` makes the scales finite.
fn random_bits<B: Block + Pod>(rng: &mut Rng, fix: impl Fn(&mut B, &mut Rng)) -> Vec<B> {
    let mut v = vec![B::default(); N / B::LEN];
    rng.fill_bytes(as_bytes_mut(&mut v));
    for b in &mut v {
        fix(b, rng);
    }
    v
}

fn scale(rng: &mut Rng) -> f16 {
    f16::from_f32(rng.normal() * 0.05)
}

fn main() {
    let mut rng = Rng::new(20261124);
    let x = rng.varied(N, 32);
    let mut w = GgufWriter::new();
    let mut add = |name: &str, t: GgmlType, bytes: &[u8]| {
        w.add_tensor(name, t, &[N as u64], bytes.to_vec())
            .expect("valid tensor");
    };

    add("f32", GgmlType::F32, as_bytes(&x));
    add("f16", GgmlType::F16, as_bytes(&quantized::<f16>(&x)));
    add("bf16", GgmlType::BF16, as_bytes(&quantized::<bf16>(&x)));
    add(
        "q4_0",
        GgmlType::Q4_0,
        as_bytes(&quantized::<BlockQ4_0>(&x)),
    );
    add(
        "q4_1",
        GgmlType::Q4_1,
        as_bytes(&quantized::<BlockQ4_1>(&x)),
    );
    add(
        "q5_0",
        GgmlType::Q5_0,
        as_bytes(&quantized::<BlockQ5_0>(&x)),
    );
    add(
        "q5_1",
        GgmlType::Q5_1,
        as_bytes(&quantized::<BlockQ5_1>(&x)),
    );
    add(
        "q8_0",
        GgmlType::Q8_0,
        as_bytes(&quantized::<BlockQ8_0>(&x)),
    );
    add("q4_k", GgmlType::Q4_K, as_bytes(&quantized::<BlockQ4K>(&x)));
    add("q5_k", GgmlType::Q5_K, as_bytes(&quantized::<BlockQ5K>(&x)));
    add("q6_k", GgmlType::Q6_K, as_bytes(&quantized::<BlockQ6K>(&x)));
    add("q2_k", GgmlType::Q2_K, as_bytes(&quantized::<BlockQ2K>(&x)));
    add("q3_k", GgmlType::Q3_K, as_bytes(&quantized::<BlockQ3K>(&x)));
    add(
        "iq4_nl",
        GgmlType::IQ4_NL,
        as_bytes(&quantized::<BlockIQ4NL>(&x)),
    );
    add(
        "iq4_xs",
        GgmlType::IQ4_XS,
        as_bytes(&quantized::<BlockIQ4XS>(&x)),
    );

    let q40 = random_bits(&mut rng, |b: &mut BlockQ4_0, r| b.d = scale(r));
    add("bits.q4_0", GgmlType::Q4_0, as_bytes(&q40));
    let q41 = random_bits(&mut rng, |b: &mut BlockQ4_1, r| {
        (b.d, b.m) = (scale(r), scale(r))
    });
    add("bits.q4_1", GgmlType::Q4_1, as_bytes(&q41));
    let q50 = random_bits(&mut rng, |b: &mut BlockQ5_0, r| b.d = scale(r));
    add("bits.q5_0", GgmlType::Q5_0, as_bytes(&q50));
    let q51 = random_bits(&mut rng, |b: &mut BlockQ5_1, r| {
        (b.d, b.m) = (scale(r), scale(r))
    });
    add("bits.q5_1", GgmlType::Q5_1, as_bytes(&q51));
    let q80 = random_bits(&mut rng, |b: &mut BlockQ8_0, r| b.d = scale(r));
    add("bits.q8_0", GgmlType::Q8_0, as_bytes(&q80));
    let q4k = random_bits(&mut rng, |b: &mut BlockQ4K, r| {
        (b.d, b.dmin) = (scale(r), scale(r))
    });
    add("bits.q4_k", GgmlType::Q4_K, as_bytes(&q4k));
    let q5k = random_bits(&mut rng, |b: &mut BlockQ5K, r| {
        (b.d, b.dmin) = (scale(r), scale(r))
    });
    add("bits.q5_k", GgmlType::Q5_K, as_bytes(&q5k));
    let q6k = random_bits(&mut rng, |b: &mut BlockQ6K, r| b.d = scale(r));
    add("bits.q6_k", GgmlType::Q6_K, as_bytes(&q6k));
    let q2k = random_bits(&mut rng, |b: &mut BlockQ2K, r| {
        (b.d, b.dmin) = (scale(r), scale(r))
    });
    add("bits.q2_k", GgmlType::Q2_K, as_bytes(&q2k));
    let q3k = random_bits(&mut rng, |b: &mut BlockQ3K, r| b.d = scale(r));
    add("bits.q3_k", GgmlType::Q3_K, as_bytes(&q3k));
    let iq4nl = random_bits(&mut rng, |b: &mut BlockIQ4NL, r| b.d = scale(r));
    add("bits.iq4_nl", GgmlType::IQ4_NL, as_bytes(&iq4nl));
    let iq4xs = random_bits(&mut rng, |b: &mut BlockIQ4XS, r| b.d = scale(r));
    add("bits.iq4_xs", GgmlType::IQ4_XS, as_bytes(&iq4xs));

    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/quant_blocks.gguf");
    w.write_file(&out).expect("write fixture");
    println!("wrote {}", out.display());
}
