//! The command line (clap) and log set-up.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::DataplaneMode;

/// lb: a layer-4 TCP load balancer (xdp, sockmap and proxy dataplanes).
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the load balancer in the foreground. SIGTERM/SIGINT drain and exit; SIGHUP reloads.
    Run {
        /// The YAML configuration file (see config/lb.yaml for every key).
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// Override `dataplane.mode` from the file: auto, xdp, sockmap or proxy.
        #[arg(long, value_name = "MODE")]
        dataplane: Option<DataplaneMode>,
        /// Worker threads that accept and relay connections, each with its own event loop
        /// (default: one per CPU). Health checks and the admin API run on the main thread.
        #[arg(long, value_name = "N")]
        workers: Option<std::num::NonZeroUsize>,
        /// xdp: start from clean state. Removes the maps and the XDP link pinned under
        /// `pin_path` first: the program a previous daemon left attached is detached and its
        /// established flows are forgotten.
        #[arg(long)]
        fresh: bool,
    },
    /// Validate a configuration file and exit: 0 if valid, else 1 with FILE:LINE:COL errors.
    Check {
        /// The YAML configuration file to check.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Show services, backends, their state and counters from a running lb's admin API.
    Status {
        /// The admin address of the running lb (`admin.listen` in its config).
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9100")]
        admin: String,
        /// Print the raw JSON of /status instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Args)]
pub struct LogArgs {
    /// Log format: readable text, or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter, e.g. `info` or `lb=debug` (RUST_LOG syntax). Default: RUST_LOG, else info.
    #[arg(long, global = true, value_name = "FILTER")]
    pub log_level: Option<String>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Logs go to stderr: stdout is for command output (`lb check`, `lb status`).
pub fn init_tracing(args: &LogArgs) {
    use tracing_subscriber::EnvFilter;
    let filter = match &args.log_level {
        Some(level) => EnvFilter::new(level),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match args.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
