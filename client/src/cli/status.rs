//! `pictl status` and `pictl list`.

use std::io::Write;

use clap::Args;
use serde_json::{Value, json};

use super::CmdResult;
use super::format::{bytes, duration, processor, table};
use crate::{Client, proto};

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// One JSON object instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// One JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

fn sparsity_name(v: i32) -> &'static str {
    match proto::SparsityMode::try_from(v) {
        Ok(proto::SparsityMode::Dense) => "dense",
        Ok(proto::SparsityMode::Predictor) => "predictor",
        Ok(proto::SparsityMode::Gate) => "gate",
        _ => "unspecified",
    }
}

fn state_name(v: i32) -> &'static str {
    match proto::ModelState::try_from(v) {
        Ok(proto::ModelState::Serving) => "serving",
        Ok(proto::ModelState::Failed) => "failed",
        _ => "unspecified",
    }
}

pub(crate) fn model_json(m: &proto::ModelInfo) -> Value {
    json!({
        "name": m.name,
        "path": m.path,
        "size_bytes": m.size_bytes,
        "architecture": m.architecture,
        "parameters": m.parameters,
        "quantization": m.quantization,
        "context_size": m.context_size,
        "device": m.device,
        "sparsity": sparsity_name(m.sparsity),
        "hot_bytes": m.hot_bytes,
        "cold_bytes": m.cold_bytes,
        "hot_share": m.hot_share,
        "hot_hit_rate": m.hot_hit_rate,
        "active_requests": m.active_requests,
        "queued_requests": m.queued_requests,
        "max_sequences": m.max_sequences,
        "tokens_per_second": m.tokens_per_second,
        "loaded_at_unix_ms": m.loaded_at_unix_ms,
        "state": state_name(m.state),
        "failure": m.failure,
        "memory_bytes": m.memory_bytes,
        "kv_cache_tokens": m.kv_cache_tokens,
    })
}

pub async fn status(client: &Client, a: &StatusArgs, out: &mut dyn Write) -> CmdResult {
    let s = client.status().await?;
    if a.json {
        let v = json!({
            "version": s.version,
            "uptime_seconds": s.uptime_seconds,
            "devices": s.devices.iter().map(|d| json!({
                "name": d.name,
                "kind": d.kind,
                "memory_total_bytes": d.memory_total_bytes,
                "memory_used_bytes": d.memory_used_bytes,
            })).collect::<Vec<_>>(),
            "models": s.models.iter().map(model_json).collect::<Vec<_>>(),
            "memory_budget_bytes": s.memory_budget_bytes,
        });
        writeln!(out, "{v}")?;
        return Ok(());
    }
    writeln!(
        out,
        "powerinferd {}, up {}\n",
        s.version,
        duration(s.uptime_seconds)
    )?;
    let devices: Vec<Vec<String>> = s
        .devices
        .iter()
        .map(|d| {
            vec![
                d.kind.clone(),
                d.name.clone(),
                format!(
                    "{} / {}",
                    bytes(d.memory_used_bytes),
                    bytes(d.memory_total_bytes)
                ),
            ]
        })
        .collect();
    write!(
        out,
        "{}",
        table(&["DEVICE", "NAME", "MEMORY USED"], &devices)
    )?;
    writeln!(out)?;
    let held: u64 = s.models.iter().map(|m| m.memory_bytes).sum();
    if s.memory_budget_bytes > 0 {
        writeln!(
            out,
            "host memory: {} of the {} budget\n",
            bytes(held),
            bytes(s.memory_budget_bytes)
        )?;
    } else {
        writeln!(out, "host memory: {} (no budget)\n", bytes(held))?;
    }
    if s.models.is_empty() {
        writeln!(out, "no models loaded")?;
        return Ok(());
    }
    let rows: Vec<Vec<String>> = s
        .models
        .iter()
        .map(|m| {
            vec![
                m.name.clone(),
                bytes(m.hot_bytes + m.cold_bytes),
                bytes(m.memory_bytes),
                processor(m.hot_share),
                format!("{:.0}%", 100.0 * m.hot_hit_rate),
                m.context_size.to_string(),
                if m.queued_requests > 0 {
                    format!("{} (+{} queued)", m.active_requests, m.queued_requests)
                } else {
                    m.active_requests.to_string()
                },
                format!("{:.1}", m.tokens_per_second),
                sparsity_name(m.sparsity).to_owned(),
                state_name(m.state).to_owned(),
            ]
        })
        .collect();
    write!(
        out,
        "{}",
        table(
            &[
                "NAME",
                "SIZE",
                "MEMORY",
                "PROCESSOR",
                "HOT HITS",
                "CONTEXT",
                "REQUESTS",
                "TOKENS/S",
                "SPARSITY",
                "STATE"
            ],
            &rows
        )
    )?;
    for m in s.models.iter().filter(|m| !m.failure.is_empty()) {
        writeln!(out, "\n{} failed: {}", m.name, m.failure)?;
    }
    Ok(())
}

pub async fn list(client: &Client, a: &ListArgs, out: &mut dyn Write) -> CmdResult {
    let l = client.list().await?;
    let is_loaded = |name: &str| l.loaded.iter().any(|m| m.name == name);
    if a.json {
        let v = json!({
            "loaded": l.loaded.iter().map(model_json).collect::<Vec<_>>(),
            "available": l.available.iter().map(|m| json!({
                "name": m.name,
                "path": m.path,
                "size_bytes": m.size_bytes,
                "in_catalog": m.in_catalog,
                "downloaded": m.downloaded,
                "architecture": m.architecture,
                "description": m.description,
                "loaded": is_loaded(&m.name),
            })).collect::<Vec<_>>(),
        });
        writeln!(out, "{v}")?;
        return Ok(());
    }
    let mut rows: Vec<Vec<String>> = l
        .available
        .iter()
        .map(|m| {
            let state = if is_loaded(&m.name) {
                "loaded"
            } else if m.downloaded {
                "downloaded"
            } else {
                "catalog (fetched on load)"
            };
            let arch = if m.architecture.is_empty() {
                "?".to_owned()
            } else {
                m.architecture.clone()
            };
            vec![m.name.clone(), bytes(m.size_bytes), arch, state.to_owned()]
        })
        .collect();
    // Models loaded from paths outside the models directory.
    for m in l
        .loaded
        .iter()
        .filter(|m| !l.available.iter().any(|a| a.name == m.name))
    {
        rows.push(vec![
            m.name.clone(),
            bytes(m.size_bytes),
            m.architecture.clone(),
            "loaded".into(),
        ]);
    }
    write!(
        out,
        "{}",
        table(&["NAME", "SIZE", "ARCHITECTURE", "STATE"], &rows)
    )?;
    Ok(())
}
