//! Builds `lb-ebpf` for `bpfel-unknown-none` with aya-build and leaves the object in OUT_DIR,
//! where `dataplane` embeds it (`include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-xdp"))`).
//!
//! The eBPF crate is built with the same pinned stable toolchain as the host (rust-toolchain.toml)
//! and `RUSTC_BOOTSTRAP=1`, which makes aya-build pass `-Z build-std=core`: no nightly needed.
//! It needs `bpf-linker` (built against LLVM 22) on PATH: `cargo xtask setup` installs it.
use anyhow::{Context as _, anyhow};

/// The toolchain to build lb-ebpf with: the one rustup runs this build with
/// (`RUSTUP_TOOLCHAIN`), else the channel rust-toolchain.toml pins.
fn toolchain(manifest: &str) -> anyhow::Result<String> {
    if let Ok(t) = std::env::var("RUSTUP_TOOLCHAIN")
        && !t.is_empty()
    {
        return Ok(t);
    }
    let path = std::path::Path::new(manifest).join("../rust-toolchain.toml");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("channel"))
        .filter_map(|rest| rest.trim().strip_prefix('='))
        .map(|value| value.trim().trim_matches('"').to_owned())
        .next()
        .with_context(|| format!("no channel = \"...\" in {}", path.display()))
}

fn main() -> anyhow::Result<()> {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR unset")?;
    println!("cargo:rerun-if-changed=../rust-toolchain.toml");
    // aya-build watches lb-ebpf; the types the programs share live in lb-common.
    println!("cargo:rerun-if-changed=../lb-common");
    println!("cargo:rerun-if-env-changed=RUSTUP_TOOLCHAIN");
    let toolchain = toolchain(&manifest)?;
    let ebpf_dir = std::path::Path::new(&manifest).join("../lb-ebpf");
    let ebpf_dir = ebpf_dir
        .canonicalize()
        .with_context(|| format!("{}", ebpf_dir.display()))?;
    let root_dir = ebpf_dir.to_str().context("lb-ebpf path is not UTF-8")?;
    // SAFETY: this build script is single-threaded at this point; the variable only reaches
    // the child cargo that aya-build spawns for lb-ebpf.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
    .map_err(|e| anyhow!("{e:#}"))
    .context("building lb-ebpf failed: is bpf-linker on PATH? `cargo xtask setup` installs it")
}
