//! Fuzzes the GGUF reader: any byte string must give a validated header or a typed
//! error, never a panic, an out-of-bounds access, or an allocation sized by an unchecked
//! number. For accepted files, every tensor's bytes and typed views must be in bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use powerinfer_ops::GgmlType;
use powerinfer_ops::gguf::{GgufFile, GgufWriter};
use powerinfer_ops::quant::{BlockQ4_1, BlockQ8_0};

fuzz_target!(|data: &[u8]| {
    let Ok(file) = GgufFile::from_bytes(data) else {
        return;
    };
    let h = file.header();
    assert!(h.data_offset + h.data_len <= data.len() as u64 || h.tensors.is_empty());
    for t in file.tensors() {
        let bytes = file.tensor_bytes(t);
        assert_eq!(bytes.len() as u64, t.n_bytes);
        match t.dtype {
            GgmlType::F32 => _ = file.tensor_data::<f32>(t),
            GgmlType::Q4_1 => _ = file.tensor_data::<BlockQ4_1>(t),
            GgmlType::Q8_0 => _ = file.tensor_data::<BlockQ8_0>(t),
            _ => {}
        }
    }
    // What was accepted can be written back, and re-encoding that gives the same bytes
    // (compared as bytes: metadata may hold NaN floats).
    let first = rewrite(&file);
    let again = GgufFile::from_bytes(&first).expect("written file reads back");
    assert_eq!(again.tensors().len(), file.tensors().len());
    assert!(rewrite(&again) == first, "re-encoding is not stable");
});

fn rewrite(file: &GgufFile) -> Vec<u8> {
    let h = file.header();
    let mut w = GgufWriter::new().magic(h.magic).version(h.version);
    w.add_all_metadata(&h.metadata).expect("accepted metadata");
    for t in file.tensors() {
        w.add_tensor(&t.name, t.dtype, &t.dims, file.tensor_bytes(t)).expect("accepted tensor");
    }
    w.to_bytes()
}
