//! `pictl`: the command line of powerinferd. The binary is a shim over [`run`], so tests
//! drive exactly what users run, output and exit status included.
//!
//! Exit statuses: 0 ok, 1 the server refused or failed the request, 2 usage, 3 cannot
//! connect.

mod format;
mod generate;
mod models;
mod status;

use std::ffi::OsString;
use std::io::{BufRead, Write};

use clap::{Parser, Subcommand};

use crate::{Client, ClientError, DEFAULT_ADDR};

pub mod exit {
    pub const OK: u8 = 0;
    pub const SERVER_ERROR: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const CANNOT_CONNECT: u8 = 3;
}

#[derive(Parser)]
#[command(name = "pictl", version, about = "Control and query powerinferd")]
struct Cli {
    /// The daemon's gRPC address.
    #[arg(long, global = true, env = "POWERINFER_ADDR", default_value = DEFAULT_ADDR)]
    addr: String,
    /// The API key the daemon requires, if it requires one.
    #[arg(
        long,
        global = true,
        env = "POWERINFER_API_KEY",
        hide_env_values = true
    )]
    api_key: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Daemon version, uptime, devices and the loaded models.
    Status(status::StatusArgs),
    /// Models loaded and available (models directory and catalog).
    List(status::ListArgs),
    /// Load a model (fetching a catalog model on first use), showing progress.
    Load(models::LoadArgs),
    /// Fetch a catalog model into the daemon's models directory, showing its progress.
    Pull(models::PullArgs),
    /// Unload a model (running streams finish first).
    Unload(models::UnloadArgs),
    /// Generate text from a prompt, streaming to stdout.
    Generate(generate::GenerateArgs),
    /// Chat with a model interactively (its chat template; /bye or end of input quits).
    Chat(generate::ChatArgs),
    /// The token ids of a text, as generation sees them.
    Tokenize(models::TokenizeArgs),
}

/// A failed command: the message and the exit status.
pub(crate) struct Failure {
    pub status: u8,
    pub message: String,
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        let status = match &e {
            ClientError::Connect { .. } => exit::CANNOT_CONNECT,
            ClientError::InvalidAddress { .. } | ClientError::InvalidApiKey => exit::USAGE,
            ClientError::Status(s)
                if s.code() == tonic::Code::Unavailable && s.message().contains("transport") =>
            {
                exit::CANNOT_CONNECT
            }
            ClientError::Status(_) | ClientError::Truncated => exit::SERVER_ERROR,
        };
        Self {
            status,
            message: e.to_string(),
        }
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Self {
            status: exit::SERVER_ERROR,
            message: format!("writing output: {e}"),
        }
    }
}

pub(crate) type CmdResult = Result<(), Failure>;

/// Runs the command line `args` (program name first) with `input` as stdin, and returns
/// the exit status.
pub fn run<I, T>(args: I, input: &mut dyn BufRead, out: &mut dyn Write, err: &mut dyn Write) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            if e.use_stderr() {
                let _ = write!(err, "{}", e.render());
                return exit::USAGE;
            }
            let _ = write!(out, "{}", e.render());
            return exit::OK;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(err, "error: cannot start the runtime: {e}");
            return exit::SERVER_ERROR;
        }
    };
    let result = runtime.block_on(async {
        let mut client = Client::connect(&cli.addr).await?;
        if let Some(k) = cli.api_key.as_deref().filter(|k| !k.is_empty()) {
            client = client.with_api_key(k)?;
        }
        match &cli.command {
            Command::Status(a) => status::status(&client, a, out).await,
            Command::List(a) => status::list(&client, a, out).await,
            Command::Load(a) => models::load(&client, a, out, err).await,
            Command::Pull(a) => models::pull(&client, a, out, err).await,
            Command::Unload(a) => models::unload(&client, a, out).await,
            Command::Generate(a) => generate::generate(&client, a, out, err).await,
            Command::Chat(a) => generate::chat(&client, a, input, out, err).await,
            Command::Tokenize(a) => models::tokenize(&client, a, out).await,
        }
    });
    match result {
        Ok(()) => exit::OK,
        Err(f) => {
            let _ = writeln!(err, "error: {}", f.message);
            f.status
        }
    }
}
