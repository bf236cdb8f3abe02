//! `powerinferd`: the powerinfer-rs engine and daemon. All logic lives in
//! `powerinfer_daemon::cli`.

use std::process::ExitCode;

fn main() -> ExitCode {
    let status = powerinfer_daemon::cli::run(
        std::env::args_os(),
        &mut std::io::stdout().lock(),
        // Unlocked: the daemon's log lines are written to stderr from other threads.
        &mut std::io::stderr(),
    );
    ExitCode::from(status)
}
