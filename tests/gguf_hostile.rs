//! A corpus of hostile GGUF files, generated here, each refused with the expected error
//! kind; and truncations and byte mutations of a valid file, which must never panic.

use powerinfer_ops::GgmlType;
use powerinfer_ops::gguf::{GgufError, GgufWriter, Value, ValueType, parse_header};
use powerinfer_ops::rng::Rng;

/// Builds header bytes field by field, valid or not.
#[derive(Clone, Default)]
struct Raw(Vec<u8>);

impl Raw {
    fn header(version: u32, n_tensors: u64, n_kv: u64) -> Self {
        Raw::default()
            .bytes(b"GGUF")
            .u32(version)
            .u64(n_tensors)
            .u64(n_kv)
    }
    fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    fn u8(self, v: u8) -> Self {
        self.bytes(&[v])
    }
    fn u32(self, v: u32) -> Self {
        self.bytes(&v.to_le_bytes())
    }
    fn u64(self, v: u64) -> Self {
        self.bytes(&v.to_le_bytes())
    }
    fn str(self, s: &str) -> Self {
        self.u64(s.len() as u64).bytes(s.as_bytes())
    }
    fn key(self, k: &str, t: ValueType) -> Self {
        self.str(k).u32(t.id())
    }
    /// A tensor info: name, dims, type id, offset.
    fn tensor(mut self, name: &str, dims: &[u64], type_id: u32, offset: u64) -> Self {
        self = self.str(name).u32(dims.len() as u32);
        for &d in dims {
            self = self.u64(d);
        }
        self.u32(type_id).u64(offset)
    }
    /// Pads to a multiple of 32 and appends `n` data bytes.
    fn data(mut self, n: usize) -> Self {
        while !self.0.len().is_multiple_of(32) {
            self.0.push(0);
        }
        self.0.resize(self.0.len() + n, 0xab);
        self
    }
}

fn refuse(bytes: &[u8]) -> GgufError {
    match parse_header(bytes) {
        Ok(h) => panic!("accepted a hostile file: {h:?}"),
        Err(e) => e,
    }
}

macro_rules! refused {
    ($bytes:expr, $pat:pat) => {{
        let bytes: Vec<u8> = $bytes.into();
        let e = refuse(&bytes);
        assert!(matches!(e, $pat), "wrong error kind: {e:?} ({e})");
        // Messages are lowercase and end without a period.
        let msg = e.to_string();
        assert!(!msg.ends_with('.'), "{msg}");
        e
    }};
}

const Q4_0: u32 = 2;
const F32: u32 = 0;

#[test]
fn empty_and_short_files_are_truncated() {
    refused!(Vec::<u8>::new(), GgufError::Truncated { .. });
    refused!(b"GGU", GgufError::Truncated { .. });
    refused!(
        Raw::default().bytes(b"GGUF").u32(3).0,
        GgufError::Truncated { .. }
    );
}

#[test]
fn bad_magic_and_versions() {
    refused!(
        Raw::default().bytes(b"GGML").u32(3).u64(0).u64(0).0,
        GgufError::BadMagic { .. }
    );
    refused!(
        Raw::header(1, 0, 0).0,
        GgufError::UnsupportedVersion { version: 1 }
    );
    refused!(
        Raw::header(4, 0, 0).0,
        GgufError::UnsupportedVersion { version: 4 }
    );
    refused!(
        Raw::header(0, 0, 0).0,
        GgufError::UnsupportedVersion { version: 0 }
    );
    refused!(
        Raw::header(0x0300_0000, 0, 0).0,
        GgufError::BigEndian { .. }
    );
}

#[test]
fn counts_larger_than_the_file_are_refused_before_allocating() {
    let e = refused!(
        Raw::header(3, u64::MAX, 0).0,
        GgufError::CountTooLarge { .. }
    );
    assert!(e.to_string().contains("tensor count"), "{e}");
    let e = refused!(
        Raw::header(3, 0, u64::MAX).0,
        GgufError::CountTooLarge { .. }
    );
    assert!(e.to_string().contains("metadata"), "{e}");
    // An array claiming 2^61 u32 elements.
    let f = Raw::header(3, 0, 1)
        .key("a", ValueType::Array)
        .u32(ValueType::U32.id())
        .u64(1 << 61);
    let e = refused!(f.0, GgufError::CountTooLarge { .. });
    assert!(e.to_string().contains("\"a\""), "names the key: {e}");
    // An array of arrays claiming more elements than 12-byte headers could fill.
    let f = Raw::header(3, 0, 1)
        .key("n", ValueType::Array)
        .u32(ValueType::Array.id())
        .u64(1000)
        .bytes(&[0; 100]);
    refused!(f.0, GgufError::CountTooLarge { .. });
}

#[test]
fn strings_longer_than_the_file() {
    let f = Raw::header(3, 0, 1)
        .u64(u64::MAX)
        .bytes(b"key-and-some-more");
    refused!(f.0, GgufError::Truncated { .. });
    let f = Raw::header(3, 0, 1)
        .key("s", ValueType::String)
        .u64(1 << 40)
        .bytes(b"abc");
    let e = refused!(f.0, GgufError::Truncated { .. });
    assert!(e.to_string().contains("\"s\""), "{e}");
    // A string array whose third element runs past the end.
    let f = Raw::header(3, 0, 1)
        .key("list", ValueType::Array)
        .u32(ValueType::String.id())
        .u64(3)
        .str("x")
        .str("y")
        .u64(99)
        .bytes(b"z");
    let e = refused!(f.0, GgufError::Truncated { .. });
    assert!(e.to_string().contains("list"), "{e}");
}

#[test]
fn invalid_utf8_unknown_types_and_bad_bools() {
    let f = Raw::header(3, 0, 1)
        .u64(2)
        .bytes(&[0xff, 0xfe])
        .u32(0)
        .u8(1);
    refused!(f.0, GgufError::InvalidUtf8 { .. });
    let f = Raw::header(3, 0, 1).str("k").u32(13).u64(0);
    refused!(f.0, GgufError::UnknownValueType { type_id: 13, .. });
    let f = Raw::header(3, 0, 1).key("b", ValueType::Bool).u8(2);
    refused!(f.0, GgufError::InvalidBool { byte: 2, .. });
    let f = Raw::header(3, 0, 1)
        .key("a", ValueType::Array)
        .u32(77)
        .u64(0);
    refused!(f.0, GgufError::UnknownValueType { type_id: 77, .. });
}

#[test]
fn nesting_too_deep() {
    let mut f = Raw::header(3, 0, 1).key("deep", ValueType::Array);
    for _ in 0..40 {
        f = f.u32(ValueType::Array.id()).u64(1);
    }
    f = f.u32(ValueType::U8.id()).u64(0).bytes(&[0; 64]);
    refused!(f.0, GgufError::NestingTooDeep { .. });
}

#[test]
fn duplicate_keys() {
    let f = Raw::header(3, 0, 2)
        .key("k", ValueType::U8)
        .u8(1)
        .key("k", ValueType::U8)
        .u8(2);
    refused!(f.0, GgufError::DuplicateKey { .. });
}

#[test]
fn bad_alignment_values() {
    let align = |v: u32| {
        Raw::header(3, 0, 1)
            .key("general.alignment", ValueType::U32)
            .u32(v)
            .0
    };
    refused!(align(0), GgufError::BadAlignment { .. });
    refused!(align(3), GgufError::BadAlignment { .. });
    refused!(align(48), GgufError::BadAlignment { .. });
    let f = Raw::header(3, 0, 1)
        .key("general.alignment", ValueType::String)
        .str("32");
    refused!(f.0, GgufError::BadAlignment { .. });
}

#[test]
fn bad_tensor_dims_and_shapes() {
    let t = |dims: &[u64], ty: u32| Raw::header(3, 1, 0).tensor("t", dims, ty, 0).data(64).0;
    refused!(
        t(&[1, 1, 1, 1, 1], F32),
        GgufError::BadDimCount { n_dims: 5, .. }
    );
    refused!(t(&[], F32), GgufError::BadDimCount { n_dims: 0, .. });
    refused!(t(&[1 << 40, 1 << 40], F32), GgufError::ShapeOverflow { .. });
    refused!(t(&[1 << 62, 4], F32), GgufError::ShapeOverflow { .. });
    refused!(t(&[32], 99), GgufError::UnknownDtype { type_id: 99, .. });
    refused!(t(&[32], 4), GgufError::UnknownDtype { type_id: 4, .. });
    refused!(
        t(&[33, 2], Q4_0),
        GgufError::SizeMismatch { row_len: 33, .. }
    );
}

#[test]
fn duplicate_tensor_names() {
    let f = Raw::header(3, 2, 0)
        .tensor("w", &[8], F32, 0)
        .tensor("w", &[8], F32, 32)
        .data(64);
    refused!(f.0, GgufError::DuplicateTensor { .. });
}

#[test]
fn offsets_misaligned_out_of_bounds_or_overlapping() {
    let f = Raw::header(3, 1, 0).tensor("w", &[8], F32, 7).data(64);
    refused!(f.0, GgufError::MisalignedOffset { offset: 7, .. });
    let f = Raw::header(3, 1, 0).tensor("w", &[8], F32, 64).data(64);
    refused!(f.0, GgufError::TensorOutOfBounds { .. });
    let f = Raw::header(3, 1, 0)
        .tensor("w", &[8], F32, u64::MAX - 31)
        .data(64);
    refused!(f.0, GgufError::TensorOutOfBounds { .. });
    let f = Raw::header(3, 2, 0)
        .tensor("a", &[16], F32, 0)
        .tensor("b", &[16], F32, 32)
        .data(128);
    refused!(f.0, GgufError::OverlappingTensors { .. });
    // The data section holds fewer bytes than the tensor table says.
    let f = Raw::header(3, 1, 0).tensor("w", &[1024], F32, 0).data(100);
    refused!(f.0, GgufError::TensorOutOfBounds { .. });
    // Tensors present but the file ends before the (padded) data section starts.
    let f = Raw::header(3, 1, 0).tensor("w", &[8], F32, 0);
    assert!(
        !f.0.len().is_multiple_of(32),
        "the header must need padding for this case"
    );
    refused!(f.0, GgufError::DataOutOfBounds { .. });
}

#[test]
fn truncated_in_tensor_infos_and_values() {
    // Counts pass their bound (enough bytes follow) but the second entry is cut short.
    let f = Raw::header(3, 2, 0)
        .tensor("a", &[8], F32, 0)
        .str(&"b".repeat(40))
        .u32(1);
    refused!(f.0, GgufError::Truncated { .. });
    let f = Raw::header(3, 0, 3)
        .key("a", ValueType::U8)
        .u8(1)
        .key("b", ValueType::U8)
        .u8(1)
        .str(&"c".repeat(30));
    refused!(f.0, GgufError::Truncated { .. });
    let f = Raw::header(3, 0, 1).key("f", ValueType::F32).bytes(&[0, 0]);
    refused!(f.0, GgufError::Truncated { .. });
}

/// A small valid file with metadata of several types and two tensors.
fn valid_file() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", Value::String("llama".into()))
        .unwrap();
    w.add_metadata("n", Value::U32(7)).unwrap();
    w.add_metadata(
        "list",
        Value::Array(powerinfer_ops::gguf::Array::String(vec![
            "a".into(),
            "bc".into(),
        ])),
    )
    .unwrap();
    w.add_tensor("a", GgmlType::F32, &[8, 2], vec![1u8; 64])
        .unwrap();
    w.add_tensor("b", GgmlType::Q4_0, &[32], vec![2u8; 18])
        .unwrap();
    w.to_bytes()
}

#[test]
fn every_truncation_of_a_valid_file_is_refused() {
    let bytes = valid_file();
    parse_header(&bytes).expect("the untouched file is valid");
    let data_end = bytes.len();
    for len in 0..data_end {
        // Cutting only padding after the last tensor's bytes can leave a valid file.
        if let Ok(h) = parse_header(&bytes[..len]) {
            let last_end = h
                .tensors
                .iter()
                .map(|t| h.data_offset + t.offset + t.n_bytes)
                .max();
            assert!(
                last_end.is_some_and(|e| e <= len as u64),
                "accepted a cut at {len}"
            );
        }
    }
}

#[test]
fn random_byte_mutations_never_panic() {
    let bytes = valid_file();
    let mut rng = Rng::new(42);
    for _ in 0..20_000 {
        let mut m = bytes.clone();
        for _ in 0..1 + rng.below(4) {
            let i = rng.below(m.len() as u64) as usize;
            m[i] = rng.next_u64() as u8;
        }
        // Only the absence of a panic (and of a huge allocation) is asserted here.
        let _ = parse_header(&m);
    }
}
