//! lb's developer tasks, the things cargo alone cannot do:
//! - `cargo xtask setup`: install the eBPF toolchain (LLVM 22, bpf-linker, rust-src), mount bpffs.
//! - `cargo xtask test`: setup, fmt, clippy (host and eBPF), unit and end-to-end tests.
//! - `cargo xtask demo`: three demo backends, lb in front, a few hundred connections.
//! - `cargo xtask bench`: lb side by side with no balancer, HAProxy and nginx.
//! - `cargo xtask torture`: the randomized torture suite for as long as asked, per dataplane.

mod bench;
mod demo;
mod setup;
mod torture;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "lb's developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (idempotent; prints each step and its time).
    Setup,
    /// Setup, `cargo fmt --check`, clippy on host crates and lb-ebpf, unit and end-to-end tests.
    Test {
        /// Only run tests whose name contains this string (passed to the test harness).
        filter: Option<String>,
    },
    /// Run the demo: three backends, lb in front, traffic spread and a backend failure.
    Demo,
    /// Benchmarks side by side with the peers; writes docs/benchmarks.md.
    Bench {
        /// Runs per figure (the median is reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Seconds per load run.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Only these figures (comma separated: rr,rate50,rate80,conn,bulk,rss,relay,xdp).
        #[arg(long)]
        only: Option<String>,
    },
    /// The torture suite (tests/tests/torture.rs) for N minutes per dataplane and mode.
    Torture {
        /// Minutes per dataplane and mode.
        #[arg(long, default_value_t = 5)]
        minutes: u64,
        /// Only this one (proxy, proxy-concurrent, sockmap-concurrent, auto,
        /// sockmap-defaults, sockmap-at-once, sockmap-1000, xdp-nat-native, xdp-nat-generic,
        /// xdp-dsr-native, xdp-dsr-generic), or a prefix of several (sockmap, xdp).
        #[arg(long)]
        dataplane: Option<String>,
        /// Replay this seed (printed by every run).
        #[arg(long)]
        seed: Option<u64>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::Setup => setup::setup(),
        Task::Test { filter } => test(filter.as_deref()),
        Task::Demo => demo::demo(),
        Task::Bench {
            runs,
            seconds,
            only,
        } => bench::bench(runs, seconds, only.as_deref()),
        Task::Torture {
            minutes,
            dataplane,
            seed,
        } => torture::torture(minutes, dataplane.as_deref(), seed),
    }
}

fn test(filter: Option<&str>) -> anyhow::Result<()> {
    use util::{cargo, step};
    setup::setup()?;
    step("cargo fmt --check", || {
        cargo(&["fmt", "--all", "--check"], &[])
    })?;
    step("clippy (host crates)", || {
        cargo(
            &[
                "clippy",
                "--workspace",
                "--exclude",
                "lb-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
            &[],
        )
    })?;
    step("clippy (lb-ebpf, bpfel-unknown-none)", || {
        cargo(
            &[
                "clippy",
                "-p",
                "lb-ebpf",
                "--release",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--",
                "-D",
                "warnings",
            ],
            &[("RUSTC_BOOTSTRAP", "1")],
        )
    })?;
    step("build lb", || cargo(&["build", "-p", "lb-userspace"], &[]))?;
    let mut args = vec!["test", "--workspace", "--exclude", "lb-ebpf"];
    if let Some(f) = filter {
        args.extend(["--", f]);
    }
    let started = std::time::Instant::now();
    let totals = step("unit and end-to-end tests", || util::cargo_test(&args))?;
    eprintln!(
        "xtask test: all steps passed; tests took {:.0}s",
        started.elapsed().as_secs_f64()
    );
    // The last line: one summary over every test binary, for people and for CI.
    println!(
        "tests: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    Ok(())
}
