//! The real default model, SmolLM2-135M-Instruct Q4_1: its header and all 272 tensor
//! infos read, every tensor viewable, and re-encoding it reproduces the file byte for byte.

use powerinfer_ops::GgmlType;
use powerinfer_ops::gguf::{GgufFile, GgufWriter, Magic};
use powerinfer_ops::quant::{Block, BlockQ4_1, BlockQ8_0};
use powerinfer_tests::default_model;

#[test]
fn header_and_all_tensor_infos() {
    let file = GgufFile::open(default_model()).unwrap();
    let h = file.header();
    assert_eq!(h.magic, Magic::Gguf);
    assert_eq!(h.version, 3);
    assert_eq!(h.alignment, 32);
    let md = &h.metadata;
    assert_eq!(
        md.get("general.architecture").and_then(|v| v.as_str()),
        Some("llama")
    );
    assert_eq!(
        md.get("llama.block_count").and_then(|v| v.as_u64()),
        Some(30)
    );
    assert_eq!(
        md.get("llama.embedding_length").and_then(|v| v.as_u64()),
        Some(576)
    );
    assert_eq!(
        md.get("llama.feed_forward_length").and_then(|v| v.as_u64()),
        Some(1536)
    );
    assert_eq!(
        md.get("llama.attention.head_count")
            .and_then(|v| v.as_u64()),
        Some(9)
    );
    assert_eq!(
        md.get("llama.attention.head_count_kv")
            .and_then(|v| v.as_u64()),
        Some(3)
    );
    assert_eq!(
        md.get("tokenizer.ggml.model").and_then(|v| v.as_str()),
        Some("gpt2")
    );
    let tokens = md
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.as_array())
        .unwrap();
    assert_eq!(tokens.len(), 49152);
    assert_eq!(tokens.as_strings().unwrap()[1], "<|im_start|>");

    assert_eq!(h.tensors.len(), 272);
    let embd = file.tensor("token_embd.weight").unwrap();
    assert_eq!(
        (embd.dtype, embd.dims.as_slice()),
        (GgmlType::Q8_0, &[576u64, 49152][..])
    );
    assert!(
        file.tensor("output.weight").is_none(),
        "SmolLM2 ties its output to the embedding"
    );
    let mut q41 = 0;
    for t in &h.tensors {
        match t.dtype {
            GgmlType::Q4_1 => {
                q41 += 1;
                file.tensor_data::<BlockQ4_1>(t).unwrap();
            }
            GgmlType::Q8_0 => _ = file.tensor_data::<BlockQ8_0>(t).unwrap(),
            GgmlType::F32 => _ = file.tensor_data::<f32>(t).unwrap(),
            other => panic!("unexpected type {other} for {}", t.name),
        }
    }
    assert_eq!(q41, 30 * 7, "seven Q4_1 matrices per layer");
    let total: u64 = h.tensors.iter().map(|t| t.n_bytes).sum();
    assert!(total <= h.data_len);

    // A dequantized embedding row holds small finite values of both signs.
    let row = &file.tensor_data::<BlockQ8_0>(embd).unwrap()[..576 / 32];
    let mut v = vec![0.0; 576];
    BlockQ8_0::dequantize(row, &mut v);
    assert!(v.iter().all(|x| x.is_finite() && x.abs() < 10.0));
    assert!(v.iter().any(|&x| x > 0.0) && v.iter().any(|&x| x < 0.0));
}

#[test]
fn re_encoding_reproduces_the_file_byte_for_byte() {
    let original = std::fs::read(default_model()).unwrap();
    let file = GgufFile::from_bytes(&original).unwrap();
    let mut w = GgufWriter::new().version(file.header().version);
    w.add_all_metadata(file.metadata()).unwrap();
    for t in file.tensors() {
        w.add_tensor(&t.name, t.dtype, &t.dims, file.tensor_bytes(t))
            .unwrap();
    }
    let bytes = w.to_bytes();
    assert_eq!(bytes.len(), original.len());
    assert!(bytes == original, "re-encoded file differs");
}
