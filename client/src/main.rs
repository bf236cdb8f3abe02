//! `pictl`: the command line of powerinferd. All logic lives in
//! `powerinfer_client::cli`.

use std::process::ExitCode;

fn main() -> ExitCode {
    let status = powerinfer_client::cli::run(
        std::env::args_os(),
        &mut std::io::stdin().lock(),
        &mut std::io::stdout().lock(),
        // Unlocked: the daemon's log lines are written to stderr from other threads.
        &mut std::io::stderr(),
    );
    ExitCode::from(status)
}
