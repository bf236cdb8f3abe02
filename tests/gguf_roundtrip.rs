//! The writer round-trips everything the reader reads: both magics, versions 2 and 3,
//! every metadata value type (nested and empty arrays included), several alignments, and
//! tensors of every type, through memory and through a file with typed zero-copy views.

use powerinfer_ops::GgmlType;
use powerinfer_ops::gguf::{
    Array, FileMemory, GgufFile, GgufWriter, Magic, Value, ViewError, WriteError, parse_header,
};
use powerinfer_ops::quant::{Block, BlockQ4_1, BlockQ6K};
use powerinfer_ops::rng::Rng;
use powerinfer_ops::storage::HUGE_MIN;
use powerinfer_tests::TempDir;

fn every_value() -> Vec<(&'static str, Value)> {
    vec![
        ("t.u8", Value::U8(255)),
        ("t.i8", Value::I8(-128)),
        ("t.u16", Value::U16(65535)),
        ("t.i16", Value::I16(-32768)),
        ("t.u32", Value::U32(u32::MAX)),
        ("t.i32", Value::I32(i32::MIN)),
        ("t.f32", Value::F32(-1.5e-7)),
        ("t.bool", Value::Bool(true)),
        ("t.string", Value::String("héllo, 世界 \u{1F600}\n".into())),
        ("t.empty_string", Value::String(String::new())),
        ("t.u64", Value::U64(u64::MAX)),
        ("t.i64", Value::I64(i64::MIN)),
        ("t.f64", Value::F64(std::f64::consts::PI)),
        ("t.arr.u8", Value::Array(Array::U8(vec![0, 1, 255]))),
        ("t.arr.i8", Value::Array(Array::I8(vec![-1, 2]))),
        ("t.arr.u16", Value::Array(Array::U16(vec![9, 65535]))),
        ("t.arr.i16", Value::Array(Array::I16(vec![-9]))),
        ("t.arr.u32", Value::Array(Array::U32(vec![1, 2, 3]))),
        ("t.arr.i32", Value::Array(Array::I32(vec![-1, 0, 1]))),
        ("t.arr.f32", Value::Array(Array::F32(vec![0.5, -0.25]))),
        (
            "t.arr.bool",
            Value::Array(Array::Bool(vec![true, false, true])),
        ),
        (
            "t.arr.string",
            Value::Array(Array::String(vec!["a".into(), String::new(), "ü".into()])),
        ),
        ("t.arr.u64", Value::Array(Array::U64(vec![u64::MAX]))),
        ("t.arr.i64", Value::Array(Array::I64(vec![i64::MIN, 5]))),
        ("t.arr.f64", Value::Array(Array::F64(vec![1e300]))),
        ("t.arr.empty", Value::Array(Array::F32(vec![]))),
        (
            "t.arr.nested",
            Value::Array(Array::Array(vec![
                Array::U8(vec![1]),
                Array::String(vec!["x".into()]),
                Array::Array(vec![Array::I64(vec![-7]), Array::Array(vec![])]),
            ])),
        ),
    ]
}

fn random_tensors(rng: &mut Rng) -> Vec<(String, GgmlType, Vec<u64>, Vec<u8>)> {
    let types = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::I32,
        GgmlType::Q2_K,
        GgmlType::IQ4_NL,
    ];
    types
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            let dims = vec![t.block_len() as u64 * (1 + i as u64 % 3), 1 + i as u64 % 4];
            let n = t.bytes_for(dims.iter().product()).unwrap() as usize;
            let mut data = vec![0u8; n];
            rng.fill_bytes(&mut data);
            (
                format!("blk.{i}.{}", t.name().to_lowercase()),
                t,
                dims,
                data,
            )
        })
        .collect()
}

#[test]
fn writer_output_reads_back_identically() {
    let mut rng = Rng::new(9);
    for magic in [Magic::Gguf, Magic::PowerInfer] {
        for version in [2, 3] {
            for alignment in [None, Some(1u32), Some(64), Some(4096)] {
                let mut w = GgufWriter::new().magic(magic).version(version);
                if let Some(a) = alignment {
                    w.add_metadata("general.alignment", Value::U32(a)).unwrap();
                }
                for (k, v) in every_value() {
                    w.add_metadata(k, v).unwrap();
                }
                let tensors = random_tensors(&mut rng);
                for (name, t, dims, data) in &tensors {
                    w.add_tensor(name, *t, dims, data.as_slice()).unwrap();
                }
                let bytes = w.to_bytes();
                let file = GgufFile::from_bytes(&bytes).unwrap();
                let h = file.header();
                assert_eq!(h.magic, magic);
                assert_eq!(h.version, version);
                assert_eq!(h.alignment, u64::from(alignment.unwrap_or(32)));
                let expected: Vec<_> = alignment
                    .map(|a| ("general.alignment", Value::U32(a)))
                    .into_iter()
                    .chain(every_value())
                    .collect();
                let got: Vec<_> = h.metadata.iter().collect();
                assert_eq!(got.len(), expected.len());
                for ((gk, gv), (ek, ev)) in got.iter().zip(&expected) {
                    assert_eq!((gk, *gv), (ek, ev));
                }
                assert_eq!(h.tensors.len(), tensors.len());
                for (info, (name, t, dims, data)) in h.tensors.iter().zip(&tensors) {
                    assert_eq!((&info.name, info.dtype, &info.dims), (name, *t, dims));
                    assert_eq!(info.offset % h.alignment, 0);
                    assert_eq!(file.tensor_bytes(info), data.as_slice());
                }
                // Writing what was read gives the same bytes.
                let mut again = GgufWriter::new().magic(magic).version(version);
                again.add_all_metadata(&h.metadata).unwrap();
                for info in &h.tensors {
                    again
                        .add_tensor(&info.name, info.dtype, &info.dims, file.tensor_bytes(info))
                        .unwrap();
                }
                assert_eq!(again.to_bytes(), bytes);
            }
        }
    }
}

#[test]
fn files_on_disk_give_typed_zero_copy_views() {
    let dir = TempDir::new("roundtrip");
    let path = dir.join("model.gguf");
    let mut rng = Rng::new(11);
    let x = rng.varied(256 * 3, 32);
    let mut q41 = vec![BlockQ4_1::default(); x.len() / 32];
    BlockQ4_1::quantize(&x, &mut q41);
    let mut q6k = vec![BlockQ6K::default(); x.len() / 256];
    BlockQ6K::quantize(&x, &mut q6k);
    let mut w = GgufWriter::new();
    w.add_tensor(
        "f",
        GgmlType::F32,
        &[256, 3],
        powerinfer_ops::pod::as_bytes(&x),
    )
    .unwrap();
    w.add_tensor(
        "q41",
        GgmlType::Q4_1,
        &[256, 3],
        powerinfer_ops::pod::as_bytes(&q41),
    )
    .unwrap();
    w.add_tensor(
        "q6k",
        GgmlType::Q6_K,
        &[256, 3],
        powerinfer_ops::pod::as_bytes(&q6k),
    )
    .unwrap();
    w.write_file(&path).unwrap();

    // Read into memory (a file this small stays off the huge-page path; see
    // `large_files_read_into_memory_equal_their_map`): the same bytes as the map.
    let read = GgufFile::open_as(&path, FileMemory::Read).unwrap();
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(&read.storage()[..], &file.storage()[..]);
    assert_eq!(read.tensors(), file.tensors());
    assert_eq!(file.tensor_data_by_name::<f32>("f").unwrap(), x.as_slice());
    assert_eq!(
        file.tensor_data_by_name::<BlockQ4_1>("q41").unwrap(),
        q41.as_slice()
    );
    assert_eq!(
        file.tensor_data_by_name::<BlockQ6K>("q6k").unwrap(),
        q6k.as_slice()
    );
    // The view borrows the mapped file: no copy.
    let view = file.tensor_data_by_name::<f32>("f").unwrap();
    let range = file.tensor_range(file.tensor("f").unwrap());
    assert_eq!(view.as_ptr().cast::<u8>(), file.storage()[range].as_ptr());
    assert!(matches!(
        file.tensor_data_by_name::<BlockQ4_1>("f"),
        Err(ViewError::WrongType { .. })
    ));
    assert!(matches!(
        file.tensor_data_by_name::<f32>("nope"),
        Err(ViewError::NotFound { .. })
    ));
}

#[test]
fn large_files_read_into_memory_equal_their_map() {
    // Large enough for the huge-page buffer, with a tensor that crosses 2 MiB boundaries.
    let dir = TempDir::new("gguf-read");
    let path = dir.path().join("large.gguf");
    let mut rng = Rng::new(11);
    let x: Vec<f32> = (0..(HUGE_MIN + 3 * 4096) / 4)
        .map(|_| rng.normal())
        .collect();
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", Value::String("test".into()))
        .unwrap();
    w.add_tensor(
        "x",
        GgmlType::F32,
        &[x.len() as u64],
        powerinfer_ops::pod::as_bytes(&x),
    )
    .unwrap();
    w.write_file(&path).unwrap();
    let read = GgufFile::open_as(&path, FileMemory::Read).unwrap();
    let map = GgufFile::open_as(&path, FileMemory::Map).unwrap();
    assert!(read.storage().len() > HUGE_MIN);
    assert_eq!(&read.storage()[..], &map.storage()[..]);
    assert_eq!(read.tensor_data_by_name::<f32>("x").unwrap(), x.as_slice());
    // A file that is not there: an error naming it, either way.
    for memory in [FileMemory::Read, FileMemory::Map] {
        let err = GgufFile::open_as(dir.path().join("gone.gguf"), memory)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("gone.gguf"), "{err}");
    }
}

#[test]
fn misaligned_tensor_data_gives_a_view_error_not_ub() {
    let mut w = GgufWriter::new();
    w.add_metadata("general.alignment", Value::U32(1)).unwrap();
    w.add_tensor("pad", GgmlType::I8, &[1], vec![0u8]).unwrap();
    w.add_tensor("f", GgmlType::F32, &[4], vec![0u8; 16])
        .unwrap();
    let file = GgufFile::from_bytes(&w.to_bytes()).unwrap();
    let info = file.tensor("f").unwrap();
    if !(file.header().data_offset + info.offset).is_multiple_of(4) {
        assert!(matches!(
            file.tensor_data::<f32>(info),
            Err(ViewError::Misaligned { .. })
        ));
    }
}

#[test]
fn writer_refuses_what_the_reader_would() {
    let mut w = GgufWriter::new();
    w.add_metadata("k", Value::U8(1)).unwrap();
    assert!(matches!(
        w.add_metadata("k", Value::U8(2)),
        Err(WriteError::DuplicateKey { .. })
    ));
    assert!(matches!(
        w.add_metadata("general.alignment", Value::U32(3)),
        Err(WriteError::BadAlignment { .. })
    ));
    assert!(matches!(
        w.add_tensor("t", GgmlType::Q4_0, &[32], vec![0u8; 17]),
        Err(WriteError::TensorSize { .. })
    ));
    assert!(matches!(
        w.add_tensor("t", GgmlType::Q4_0, &[33], vec![0u8; 18]),
        Err(WriteError::TensorSize { .. })
    ));
    assert!(matches!(
        w.add_tensor("t", GgmlType::F32, &[1, 1, 1, 1, 1], vec![0u8; 4]),
        Err(WriteError::BadDimCount { .. })
    ));
    w.add_tensor("t", GgmlType::F32, &[1], vec![0u8; 4])
        .unwrap();
    assert!(matches!(
        w.add_tensor("t", GgmlType::F32, &[1], vec![0u8; 4]),
        Err(WriteError::DuplicateTensor { .. })
    ));
    parse_header(&w.to_bytes()).unwrap();
}

#[test]
fn tensors_filled_at_write_time_equal_tensors_given_up_front() {
    let dir = TempDir::new("roundtrip-later");
    let mut rng = Rng::new(13);
    let tensors = random_tensors(&mut rng);
    let mut eager = GgufWriter::new();
    let mut later = GgufWriter::new();
    for (name, t, dims, data) in &tensors {
        eager.add_tensor(name, *t, dims, data.as_slice()).unwrap();
        later.add_tensor_later(name, *t, dims).unwrap();
    }
    // The fill is asked once per tensor, in order, by index and name.
    let mut asked = Vec::new();
    let path = dir.join("later.gguf");
    later
        .write_file_with(&path, &mut |i, name| {
            asked.push((i, name.to_owned()));
            Ok(tensors[i].3.clone())
        })
        .unwrap();
    let names: Vec<_> = tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (i, t.0.clone()))
        .collect();
    assert_eq!(asked, names);
    assert_eq!(std::fs::read(&path).unwrap(), eager.to_bytes());

    // A fill that gives the wrong length, a fill that fails, and no fill at all are
    // errors, and nothing is left behind: not the file, not its temporary.
    let (i_long, _) = tensors
        .iter()
        .enumerate()
        .find(|(_, t)| !t.3.is_empty())
        .unwrap();
    let bad = dir.join("bad.gguf");
    let short = later.write_file_with(&bad, &mut |i, _| {
        let mut d = tensors[i].3.clone();
        if i == i_long {
            d.pop();
        }
        Ok(d)
    });
    assert!(matches!(short, Err(WriteError::Io { .. })), "{short:?}");
    let failing = later.write_file_with(&bad, &mut |_, name| {
        Err(std::io::Error::other(format!("cannot make {name}")))
    });
    assert!(failing.unwrap_err().to_string().contains("cannot make"));
    assert!(matches!(later.write_file(&bad), Err(WriteError::Io { .. })));
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, [std::ffi::OsString::from("later.gguf")]);
}
