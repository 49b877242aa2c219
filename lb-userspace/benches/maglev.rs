//! Maglev table build time (target: N = 100, M = 65537 in at most 3 ms) and
//! per-connection pick cost.
//!
//! The balance module is pure and self-contained, so it is compiled straight
//! into this bench rather than requiring a library target.

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{Criterion, criterion_group, criterion_main};

#[allow(dead_code)]
#[path = "../src/balance/mod.rs"]
mod balance;

use balance::{Algorithm, Candidate, PickCtx, Selector};

/// The production default table size.
const TABLE_SIZE: usize = 65_537;

fn candidates(weights: impl Iterator<Item = u32>) -> Vec<Candidate> {
    weights
        .enumerate()
        .map(|(i, weight)| Candidate {
            key: format!("10.1.{}.{}:8080", i / 250, i % 250),
            weight,
        })
        .collect()
}

fn maglev(c: &mut Criterion) {
    let equal = candidates(std::iter::repeat_n(1, 100));
    let weighted = candidates((0..100).map(|i| i % 10 + 1));
    let build = |cands: &[Candidate]| {
        Selector::new(Algorithm::Maglev, black_box(cands), TABLE_SIZE)
            .unwrap_or_else(|e| panic!("{e}"))
    };
    c.bench_function("maglev_build_n100_m65537_equal", |b| {
        b.iter(|| build(&equal))
    });
    c.bench_function("maglev_build_n100_m65537_weights_1_to_10", |b| {
        b.iter(|| build(&weighted))
    });

    let selector = build(&weighted);
    let eligible = vec![true; weighted.len()];
    let client: SocketAddr = "198.51.100.7:40000"
        .parse()
        .unwrap_or_else(|e| panic!("{e}"));
    c.bench_function("maglev_pick_n100", |b| {
        b.iter(|| {
            selector.pick(&PickCtx {
                client: black_box(client),
                eligible: &eligible,
                active: &[],
                exclude: &[],
                random: 0,
            })
        })
    });
    c.bench_function("maglev_digest_m65537", |b| {
        b.iter(|| selector.maglev_digest())
    });
}

criterion_group!(benches, maglev);
criterion_main!(benches);
