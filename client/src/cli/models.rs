//! `pictl load`, `pictl pull`, `pictl unload` and `pictl tokenize`.

use std::io::Write;

use clap::{Args, ValueEnum};
use serde_json::json;
use tokio_stream::StreamExt;

use super::CmdResult;
use super::format::{bytes, processor};
use super::status::model_json;
use crate::{Client, proto};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SparsityArg {
    Dense,
    Predictor,
    Gate,
}

impl SparsityArg {
    pub fn wire(self) -> proto::SparsityMode {
        match self {
            Self::Dense => proto::SparsityMode::Dense,
            Self::Predictor => proto::SparsityMode::Predictor,
            Self::Gate => proto::SparsityMode::Gate,
        }
    }
}

#[derive(Args, Debug)]
pub struct LoadArgs {
    /// A name in the daemon's models directory or a catalog alias.
    model: String,
    /// Device memory the model may use, e.g. 6GiB, 512MiB, 2GB or a byte count.
    #[arg(long, value_parser = parse_bytes)]
    vram_budget: Option<u64>,
    #[arg(long, value_enum)]
    sparsity: Option<SparsityArg>,
    /// cpu, cuda:N or hip:N (sim[:BYTES] for the simulated device).
    #[arg(long)]
    device: Option<String>,
    /// Context size per sequence, in tokens.
    #[arg(long)]
    ctx: Option<u32>,
    /// Print the loaded model as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct PullArgs {
    /// A catalog alias (`pictl list` shows the catalog).
    model: String,
    /// One JSON object per progress message, as the daemon sends them.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct UnloadArgs {
    model: String,
}

#[derive(Args, Debug)]
pub struct TokenizeArgs {
    model: String,
    text: String,
    /// Parse special-token text (such as <|im_start|>) as plain text.
    #[arg(long)]
    no_special: bool,
    /// One JSON object (ids and pieces).
    #[arg(long)]
    json: bool,
}

/// `6GiB`, `512MiB`, `2GB`, `100MB`, `4096`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 6GiB, 512MiB, 2GB)"))?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("unknown size unit {other:?} in {s:?}")),
    };
    let v = n * scale;
    if !v.is_finite() || v < 0.0 || v > u64::MAX as f64 {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(v as u64)
}

pub async fn pull(
    client: &Client,
    a: &PullArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> CmdResult {
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut stream = client.pull(&a.model).await?;
    let mut last_status = String::new();
    let mut finished = false;
    while let Some(item) = stream.next().await {
        let p = item?;
        finished |= p.done;
        if a.json {
            writeln!(
                out,
                "{}",
                json!({
                    "status": p.status,
                    "completed_bytes": p.completed_bytes,
                    "total_bytes": p.total_bytes,
                    "done": p.done,
                    "file": p.file,
                    "size_bytes": p.size_bytes,
                    "already_present": p.already_present,
                })
            )?;
        } else if p.done {
            if tty && !last_status.is_empty() {
                writeln!(err)?;
            }
            let how = if p.already_present {
                "already present"
            } else {
                "pulled"
            };
            writeln!(
                out,
                "{} {how}: {} ({})",
                a.model,
                p.file,
                bytes(p.size_bytes)
            )?;
        } else if !tty {
            // A log: a line as each stage starts.
            if p.status != last_status {
                writeln!(err, "{} ...", p.status)?;
                last_status = p.status;
            }
        } else {
            // One line per stage, redrawn in place.
            if p.status != last_status && !last_status.is_empty() {
                writeln!(err)?;
            }
            let amount = if p.total_bytes > 0 {
                format!(
                    "{} / {} ({:.0}%)",
                    bytes(p.completed_bytes),
                    bytes(p.total_bytes),
                    100.0 * p.completed_bytes as f64 / p.total_bytes as f64
                )
            } else {
                bytes(p.completed_bytes)
            };
            write!(err, "\r{}: {amount}\x1b[K", p.status)?;
            err.flush()?;
            last_status = p.status;
        }
    }
    if !finished {
        return Err(crate::ClientError::Truncated.into());
    }
    Ok(())
}

pub async fn load(
    client: &Client,
    a: &LoadArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> CmdResult {
    let request = proto::LoadModelRequest {
        model: a.model.clone(),
        vram_budget_bytes: a.vram_budget.unwrap_or(0),
        sparsity: a
            .sparsity
            .map_or(proto::SparsityMode::Unspecified, SparsityArg::wire)
            .into(),
        device: a.device.clone().unwrap_or_default(),
        context_size: a.ctx.unwrap_or(0),
    };
    // Progress comes from the event feed, watched while the load runs.
    let mut events = client.watch().await.ok();
    let load = client.load(request);
    tokio::pin!(load);
    let info = loop {
        let next = async {
            match events.as_mut() {
                Some(e) => e.next().await,
                None => std::future::pending().await,
            }
        };
        // Events first: those sent before the load's reply are shown before it returns.
        tokio::select! {
            biased;
            Some(Ok(proto::watch_models_response::Event::Loading(l))) = next => {
                if !a.json {
                    let _ = writeln!(err, "{}: {} ({:.0}%)", l.model, l.stage, l.progress * 100.0);
                }
            }
            r = &mut load => break r?,
        }
    };
    if a.json {
        writeln!(out, "{}", model_json(&info))?;
    } else {
        writeln!(
            out,
            "loaded {} ({}, {}, {}, context {}, {})",
            info.name,
            info.architecture,
            info.quantization,
            bytes(info.size_bytes),
            info.context_size,
            processor(info.hot_share)
        )?;
    }
    Ok(())
}

pub async fn unload(client: &Client, a: &UnloadArgs, out: &mut dyn Write) -> CmdResult {
    client.unload(&a.model).await?;
    writeln!(out, "unloaded {}", a.model)?;
    Ok(())
}

pub async fn tokenize(client: &Client, a: &TokenizeArgs, out: &mut dyn Write) -> CmdResult {
    let r = client
        .tokenize(proto::TokenizeRequest {
            model: a.model.clone(),
            text: a.text.clone(),
            add_special: true,
            parse_special: !a.no_special,
        })
        .await?;
    if a.json {
        writeln!(out, "{}", json!({"ids": r.ids, "pieces": r.pieces}))?;
    } else {
        for (id, piece) in r.ids.iter().zip(&r.pieces) {
            writeln!(out, "{id:>6}  {piece:?}")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("6GiB"), Ok(6 << 30));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("1.5 GB"), Ok(1_500_000_000));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("3 parsecs").is_err());
    }
}
