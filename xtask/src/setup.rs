//! `cargo xtask setup`: everything a fresh machine needs to build and test lb, installed only
//! when missing. Idempotent; each step says what it does and how long it took.
//!
//! - Debian packages: LLVM 22 (bpf-linker links against it; rustc 1.95 is on LLVM 22),
//!   bpftool (map dumps), iproute2 (network namespaces for tests), and the real servers and
//!   clients of `tests/tests/real_clients.rs` (redis, PostgreSQL, nginx, iperf3, openssl, curl).
//! - bpf-linker, built against LLVM 22 (`cargo install`, about a minute on 2 cores).
//! - rust-src, for `-Z build-std=core` (the eBPF target has no prebuilt core).
//! - bpffs mounted on /sys/fs/bpf (maps are pinned there).

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::util::{is_root, on_path, run, step, succeeds};

const LLVM_PACKAGES: &[&str] = &["llvm-22-dev", "libpolly-22-dev"];
const TOOL_PACKAGES: &[(&str, &str)] = &[
    ("bpftool", "bpftool"),
    ("ip", "iproute2"),
    ("ping", "iputils-ping"),
    // GRO on the veth peer that receives XDP_TX frames in the xdp end-to-end tests.
    ("ethtool", "ethtool"),
];
/// Real servers and clients run through lb by `tests/tests/real_clients.rs`: (a program the
/// package ships, the package).
const REAL_CLIENT_PACKAGES: &[(&str, &str)] = &[
    ("redis-server", "redis-server"),
    // redis-cli and redis-benchmark.
    ("redis-cli", "redis-tools"),
    ("nginx", "nginx"),
    ("iperf3", "iperf3"),
    ("openssl", "openssl"),
    ("curl", "curl"),
];
/// PostgreSQL's server programs (initdb, pg_ctl, postgres, pgbench) live in
/// `/usr/lib/postgresql/VERSION/bin`, not on PATH; Debian's `postgresql` package brings the
/// current version.
const POSTGRES_PACKAGE: &str = "postgresql";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

pub fn setup() -> anyhow::Result<()> {
    step(
        "setup: Debian packages (LLVM 22, bpftool, iproute2, real servers and clients)",
        apt_packages,
    )?;
    step("setup: bpf-linker (built against LLVM 22)", bpf_linker)?;
    step("setup: rust-src component", rust_src)?;
    step("setup: bpffs on /sys/fs/bpf", bpffs)?;
    Ok(())
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Installs Debian packages that are missing; fails clearly where it cannot.
pub fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        eprintln!("    already installed: {}", packages.join(" "));
        return Ok(());
    }
    if !on_path("apt-get") {
        bail!("missing packages {missing:?} and no apt-get here: install them by hand");
    }
    if !is_root() {
        bail!(
            "missing packages {missing:?}: run as root (sudo -E cargo xtask ...) so apt-get can install them"
        );
    }
    eprintln!("    installing with apt-get: {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))
        .context("apt-get update failed: no network to the Debian mirror?")?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .context("apt-get install failed")
}

fn apt_packages() -> anyhow::Result<()> {
    let mut packages: Vec<&str> = LLVM_PACKAGES.to_vec();
    for (tool, package) in TOOL_PACKAGES.iter().chain(REAL_CLIENT_PACKAGES) {
        if !on_path(tool) && !std::path::Path::new("/usr/sbin").join(tool).exists() {
            eprintln!("    {tool}: missing, from package {package}");
            packages.push(package);
        } else {
            eprintln!("    {tool}: present");
        }
    }
    match lb_tests::clients::postgres_bin() {
        Some(bin) => eprintln!("    PostgreSQL: present in {}", bin.display()),
        None => {
            eprintln!(
                "    PostgreSQL (initdb, pg_ctl, pgbench): missing, from package {POSTGRES_PACKAGE}"
            );
            packages.push(POSTGRES_PACKAGE);
        }
    }
    apt_install(&packages)
}

fn bpf_linker() -> anyhow::Result<()> {
    if on_path("bpf-linker") {
        eprintln!("    bpf-linker: present");
        return Ok(());
    }
    eprintln!(
        "    cargo install bpf-linker --no-default-features --features llvm-22 (links against {LLVM_PREFIX})"
    );
    let path = format!(
        "{LLVM_PREFIX}/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("PATH", path)
        .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX))
    .context("cargo install bpf-linker failed: no network to crates.io, or LLVM 22 missing")?;
    if !on_path("bpf-linker") {
        bail!("bpf-linker was installed but is not on PATH: add ~/.cargo/bin to PATH");
    }
    Ok(())
}

fn rust_src() -> anyhow::Result<()> {
    let installed = Command::new("rustup")
        .args(["component", "list", "--installed"])
        .current_dir(crate::util::root())
        .output()
        .context("rustup not found: lb builds with a rustup-managed toolchain")?;
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        eprintln!("    rust-src: present");
        return Ok(());
    }
    run(Command::new("rustup")
        .args(["component", "add", "rust-src"])
        .current_dir(crate::util::root()))
}

fn bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        eprintln!("    bpffs: mounted");
        return Ok(());
    }
    if !is_root() {
        eprintln!(
            "    bpffs: not mounted, and mounting needs root (only privileged tests need it)"
        );
        return Ok(());
    }
    if !succeeds("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"]) {
        bail!("cannot mount bpffs on /sys/fs/bpf");
    }
    eprintln!("    bpffs: mounted now");
    Ok(())
}
