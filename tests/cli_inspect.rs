//! `powerinferd inspect` on the real model, on our own files, and on bad files.

use powerinfer_ops::GgmlType;
use powerinfer_ops::gguf::{Array, GgufWriter, Magic, Value};
use powerinfer_tests::{TempDir, default_model, powerinferd};

#[test]
fn text_dump_of_the_real_model() {
    let path = default_model().to_str().unwrap();
    let out = powerinferd(&["inspect", path]);
    assert_eq!(out.status, 0, "{}", out.stderr);
    assert!(out.stdout.contains("magic:       GGUF (version 3)"));
    assert!(out.stdout.contains("general.architecture = \"llama\""));
    assert!(
        out.stdout
            .contains("tokenizer.ggml.tokens = [\"<|endoftext|>\"")
    );
    assert!(
        out.stdout.contains("(49152 items)]"),
        "long arrays are abbreviated"
    );
    assert!(out.stdout.contains("tensors: 272"));
    assert!(out.stdout.lines().any(|l| l.contains("token_embd.weight")
        && l.contains("Q8_0")
        && l.contains("576 x 49152")
        && l.contains("30081024")));
    assert!(
        out.stdout.len() < 64 * 1024,
        "abbreviated output stays small"
    );
}

#[test]
fn json_dump_of_the_real_model() {
    let path = default_model().to_str().unwrap();
    let out = powerinferd(&["inspect", path, "--json"]);
    assert_eq!(out.status, 0, "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["magic"], "GGUF");
    assert_eq!(v["version"], 3);
    assert_eq!(v["tensors"].as_array().unwrap().len(), 272);
    let embd = &v["tensors"][0];
    assert_eq!(embd["name"], "token_embd.weight");
    assert_eq!(embd["type"], "Q8_0");
    assert_eq!(embd["shape"], serde_json::json!([576, 49152]));
    assert_eq!(embd["n_bytes"], 30081024);
    let tokens = v["metadata"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["key"] == "tokenizer.ggml.tokens")
        .unwrap();
    assert_eq!(tokens["value"]["len"], 49152);
    assert_eq!(tokens["value"]["truncated"], true);
}

#[test]
fn powerinfer_magic_and_nested_arrays_are_shown() {
    let dir = TempDir::new("inspect");
    let path = dir.join("sparse.gguf");
    let mut w = GgufWriter::new().magic(Magic::PowerInfer);
    w.add_metadata("powerinfer.sparse_threshold", Value::F32(0.0))
        .unwrap();
    w.add_metadata(
        "nested",
        Value::Array(Array::Array(vec![Array::U8(vec![1, 2])])),
    )
    .unwrap();
    w.add_tensor(
        "blk.0.fc1.weight",
        GgmlType::F16,
        &[64, 16],
        vec![0u8; 64 * 16 * 2],
    )
    .unwrap();
    w.write_file(&path).unwrap();
    let out = powerinferd(&["inspect", path.to_str().unwrap()]);
    assert_eq!(out.status, 0, "{}", out.stderr);
    assert!(out.stdout.contains("PWRI"), "{}", out.stdout);
    assert!(out.stdout.contains("nested = [[1, 2]]"), "{}", out.stdout);
    assert!(out.stdout.contains("blk.0.fc1.weight"));
}

#[test]
fn bad_files_exit_2_with_the_typed_error() {
    let dir = TempDir::new("inspect-bad");
    let bad = dir.join("bad.gguf");
    let mut bytes = b"GGUF\x03\x00\x00\x00".to_vec();
    bytes.extend_from_slice(&u64::MAX.to_le_bytes()); // tensor count
    bytes.extend_from_slice(&0u64.to_le_bytes()); // metadata count
    std::fs::write(&bad, bytes).unwrap();
    let out = powerinferd(&["inspect", bad.to_str().unwrap()]);
    assert_eq!(out.status, 2);
    assert!(out.stdout.is_empty());
    assert!(out.stderr.contains("tensor count"), "{}", out.stderr);

    let missing = dir.join("missing.gguf");
    let out = powerinferd(&["inspect", missing.to_str().unwrap()]);
    assert_eq!(out.status, 2);
    assert!(out.stderr.contains("cannot read"), "{}", out.stderr);

    let out = powerinferd(&["inspect"]);
    assert_eq!(out.status, 2, "usage error");
    let out = powerinferd(&["--version"]);
    assert_eq!(out.status, 0);
    assert!(out.stdout.starts_with("powerinferd "));
}
