//! `cargo xtask torture`: runs the torture suite's tests (tests/tests/torture.rs) one at a
//! time, each for the minutes asked, with no round limit, and prints each one's rounds, rounds
//! per second and seed as the test reports them.

use anyhow::bail;

use crate::util::{cargo, step};

/// The torture tests by the name `--dataplane` takes.
const VARIANTS: &[(&str, &str)] = &[
    ("proxy", "torture_proxy"),
    ("proxy-concurrent", "torture_proxy_concurrent"),
    ("sockmap-concurrent", "torture_sockmap_concurrent"),
    ("auto", "torture_auto_with_shipped_defaults"),
    ("sockmap-defaults", "torture_sockmap_with_shipped_defaults"),
    ("sockmap-at-once", "torture_sockmap_promoted_at_once"),
    (
        "sockmap-1000",
        "torture_sockmap_small_threshold_crossed_mid_write",
    ),
    ("xdp-nat-native", "torture_xdp_nat_native"),
    ("xdp-nat-generic", "torture_xdp_nat_generic"),
    ("xdp-dsr-native", "torture_xdp_dsr_native"),
    ("xdp-dsr-generic", "torture_xdp_dsr_generic"),
];

pub fn torture(minutes: u64, dataplane: Option<&str>, seed: Option<u64>) -> anyhow::Result<()> {
    let chosen: Vec<&(&str, &str)> = VARIANTS
        .iter()
        .filter(|(name, _)| dataplane.is_none_or(|d| name.starts_with(d)))
        .collect();
    if chosen.is_empty() {
        let names: Vec<&str> = VARIANTS.iter().map(|(n, _)| *n).collect();
        bail!("no torture variant matches {dataplane:?}; known: {names:?}");
    }
    crate::setup::setup()?;
    step("build lb", || cargo(&["build", "-p", "lb-userspace"], &[]))?;
    let seconds = (minutes * 60).to_string();
    let seed = seed.map(|s| s.to_string());
    let mut env = vec![
        ("LB_TORTURE_SECONDS", seconds.as_str()),
        // Long runs also draw the full sizes on xdp.
        ("LB_TORTURE_MAX_LEN", "67108864"),
    ];
    if let Some(seed) = &seed {
        env.push(("LB_TORTURE_SEED", seed));
    }
    for (name, test) in chosen {
        step(&format!("torture {name} for {minutes} min"), || {
            cargo(
                &[
                    "test",
                    "-p",
                    "lb-tests",
                    "--test",
                    "torture",
                    "--",
                    "--exact",
                    test,
                    "--nocapture",
                ],
                &env,
            )
        })?;
    }
    Ok(())
}
