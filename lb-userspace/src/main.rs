//! `lb`: a layer-4 TCP load balancer for Linux.
//!
//! Map of the crate, in the order data flows:
//! - `config`: the YAML schema, validated into strong types (the only place YAML is seen).
//! - `state`: runtime state of services and backends (counters, health, drain), shared by handles.
//! - `balance`: pure backend selection (round robin, weighted, least connections, random,
//!   Maglev, source hash).
//! - `health`: active probes and passive ejection, feeding `state`.
//! - `dataplane`: proxy (splice relay), xdp (the loaded XDP object); which one runs and why.
//! - `control`: signals and the daemon's lifecycle.
//! - `sys`: the few raw syscalls, each with its SAFETY note.

mod balance;
mod cli;
mod config;
mod control;
mod dataplane;
mod health;
mod proxy_protocol;
mod state;
mod sys;

use std::process::ExitCode;

use clap::Parser as _;

/// Exit code of `lb run` after a panic anywhere (sysexits' EX_SOFTWARE): the process ends,
/// so a supervisor restarts it, rather than living on with a dead thread and serving nothing.
const EXIT_PANIC: i32 = 70;

/// Set in the environment (`LB_TEST_PANIC_ON_CONNECTION`), lb panics on purpose in the first
/// connection it handles (the test of [`exit_on_panic`]). Read once, not per connection.
pub static PANIC_ON_CONNECTION: std::sync::LazyLock<bool> =
    std::sync::LazyLock::new(|| std::env::var_os("LB_TEST_PANIC_ON_CONNECTION").is_some());

/// Makes any panic, on any thread, end the process with [`EXIT_PANIC`] once it is logged.
fn exit_on_panic() {
    let print = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        print(info);
        tracing::error!(panic = %info, "lb panicked; exiting (code {EXIT_PANIC}) so that a supervisor restarts it");
        std::process::exit(EXIT_PANIC);
    }));
}

/// Exit code of `lb run` when the configuration is invalid (sysexits' EX_CONFIG), so a
/// supervisor can tell "fix the file" from "crashed".
const EXIT_BAD_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    cli::init_tracing(&cli.log);
    match cli.command {
        cli::Command::Check { config } => match config::load(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::FAILURE
            }
        },
        cli::Command::Run {
            config: path,
            dataplane,
            workers,
            fresh,
        } => {
            exit_on_panic();
            // Load and validate before binding or attaching anything.
            let mut config = match config::load(&path) {
                Ok(config) => config,
                Err(errors) => {
                    eprintln!("{errors}");
                    tracing::error!(file = %path.display(), "invalid configuration, not starting");
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
            };
            if let Some(mode) = dataplane
                && let Err(conflicts) = config.override_dataplane_mode(mode)
            {
                eprintln!("{conflicts}");
                return ExitCode::from(EXIT_BAD_CONFIG);
            }
            match control::run_daemon(path, config, workers, fresh) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    tracing::error!("{error:#}");
                    eprintln!("lb: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
        cli::Command::Status { admin, json } => match control::status::print(&admin, json) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("lb status: {error:#}");
                ExitCode::FAILURE
            }
        },
    }
}
