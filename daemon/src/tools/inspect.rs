//! `powerinferd inspect`: a GGUF file's header, metadata and tensor table, as text (in the
//! manner of gguf-dump) or JSON.

use std::io::{self, Write};

use powerinfer_ops::gguf::{Array, GgufFile, Value};
use serde_json::{Map, Value as Json, json};

/// Arrays longer than this are shown abbreviated.
pub const MAX_ARRAY_ITEMS: usize = 8;
/// String values longer than this (chat templates) are cut in text output.
const MAX_TEXT_STRING: usize = 120;

fn type_label(v: &Value) -> String {
    match v {
        Value::Array(a) => format!("[{}; {}]", a.elem_type(), a.len()),
        other => other.value_type().to_string(),
    }
}

fn shape(dims: &[u64]) -> String {
    dims.iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(" x ")
}

fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return format!("{s:?}");
    }
    let head: String = s.chars().take(max).collect();
    format!("{head:?}... ({} chars)", s.chars().count())
}

fn text_value(v: &Value) -> String {
    match v {
        Value::String(s) => cut(s, MAX_TEXT_STRING),
        Value::Array(a) => a.display_abbreviated(MAX_ARRAY_ITEMS),
        other => other.to_string(),
    }
}

/// Writes the human-readable dump.
pub fn write_text(file: &GgufFile, out: &mut dyn Write) -> io::Result<()> {
    let h = file.header();
    if let Some(p) = file.path() {
        writeln!(out, "file:        {}", p.display())?;
    }
    writeln!(
        out,
        "magic:       {} (version {})",
        h.magic.as_str(),
        h.version
    )?;
    writeln!(out, "alignment:   {}", h.alignment)?;
    writeln!(out, "header:      {} bytes", h.header_len)?;
    writeln!(
        out,
        "data:        offset {}, {} bytes",
        h.data_offset, h.data_len
    )?;
    writeln!(out)?;
    writeln!(out, "metadata: {} key(s)", h.metadata.len())?;
    for (i, (key, value)) in h.metadata.iter().enumerate() {
        writeln!(
            out,
            "{:>6}: {:<18} {key} = {}",
            i + 1,
            type_label(value),
            text_value(value)
        )?;
    }
    writeln!(out)?;
    writeln!(out, "tensors: {}", h.tensors.len())?;
    let name_w = h
        .tensors
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    writeln!(
        out,
        "{:>6}  {:<name_w$}  {:<7} {:<22} {:>12} {:>12}",
        "#", "name", "type", "shape", "offset", "bytes"
    )?;
    for (i, t) in h.tensors.iter().enumerate() {
        writeln!(
            out,
            "{:>6}  {:<name_w$}  {:<7} {:<22} {:>12} {:>12}",
            i + 1,
            t.name,
            t.dtype.name(),
            shape(&t.dims),
            t.offset,
            t.n_bytes
        )?;
    }
    Ok(())
}

fn json_array(a: &Array) -> Json {
    let n = a.len();
    let take = n.min(MAX_ARRAY_ITEMS);
    let items: Vec<Json> = match a {
        Array::U8(v) => v[..take].iter().map(|x| json!(x)).collect(),
        Array::I8(v) => v[..take].iter().map(|x| json!(x)).collect(),
        Array::U16(v) => v[..take].iter().map(|x| json!(x)).collect(),
        Array::I16(v) => v[..take].iter().map(|x| json!(x)).collect(),
        Array::U32(v) => v[..take].iter().map(|x| json!(x)).collect(),
        Array::I32(v) => v[..take].iter().map(|x| json!(x)).collect(),
        Array::F32(v) => v[..take].iter().map(|x| json!(x)).collect(),
        Array::Bool(v) => v[..take].iter().map(|x| json!(x)).collect(),
        Array::String(v) => v[..take].iter().map(|x| json!(x)).collect(),
        Array::Array(v) => v[..take].iter().map(json_array).collect(),
        Array::U64(v) => v[..take].iter().map(|x| json!(x)).collect(),
        Array::I64(v) => v[..take].iter().map(|x| json!(x)).collect(),
        Array::F64(v) => v[..take].iter().map(|x| json!(x)).collect(),
    };
    json!({
        "elem_type": a.elem_type().name(),
        "len": n,
        "items": items,
        "truncated": n > take,
    })
}

fn json_value(v: &Value) -> Json {
    match v {
        Value::U8(x) => json!(x),
        Value::I8(x) => json!(x),
        Value::U16(x) => json!(x),
        Value::I16(x) => json!(x),
        Value::U32(x) => json!(x),
        Value::I32(x) => json!(x),
        Value::F32(x) => json!(x),
        Value::Bool(x) => json!(x),
        Value::String(x) => json!(x),
        Value::Array(a) => json_array(a),
        Value::U64(x) => json!(x),
        Value::I64(x) => json!(x),
        Value::F64(x) => json!(x),
    }
}

/// The dump as one JSON object (arrays abbreviated to their first items plus `len`).
pub fn to_json(file: &GgufFile) -> Json {
    let h = file.header();
    let metadata: Vec<Json> = h
        .metadata
        .iter()
        .map(|(k, v)| json!({ "key": k, "type": v.value_type().name(), "value": json_value(v) }))
        .collect();
    let tensors: Vec<Json> = h
        .tensors
        .iter()
        .map(|t| {
            json!({
                "name": t.name,
                "type": t.dtype.name(),
                "shape": t.dims,
                "offset": t.offset,
                "n_bytes": t.n_bytes,
            })
        })
        .collect();
    let mut obj = Map::new();
    if let Some(p) = file.path() {
        obj.insert("path".into(), json!(p.display().to_string()));
    }
    obj.insert("magic".into(), json!(h.magic.as_str()));
    obj.insert("version".into(), json!(h.version));
    obj.insert("alignment".into(), json!(h.alignment));
    obj.insert("header_len".into(), json!(h.header_len));
    obj.insert("data_offset".into(), json!(h.data_offset));
    obj.insert("data_len".into(), json!(h.data_len));
    obj.insert("metadata".into(), Json::Array(metadata));
    obj.insert("tensors".into(), Json::Array(tensors));
    Json::Object(obj)
}
