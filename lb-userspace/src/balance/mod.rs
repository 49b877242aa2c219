//! Backend selection: given one pool's backend set and the facts about one
//! incoming connection, decide which backend gets that connection.
//!
//! Everything here is pure and deterministic: no I/O, no clocks, no global
//! state. Randomness is supplied by the caller ([`PickCtx::random`]), health
//! and connection counts are supplied by the caller ([`PickCtx::eligible`],
//! [`PickCtx::active`]). The only mutable state lives inside a [`Selector`]
//! (the round-robin cursor and the smooth weighted round-robin counters) and
//! is kept behind interior mutability, so one `Selector` built per
//! backend-set change can be shared by every connection task.
//!
//! | algorithm | what it does | state |
//! | --- | --- | --- |
//! | [`Algorithm::RoundRobin`] | cycles over usable candidates, ignoring weight | `AtomicUsize` ticket |
//! | [`Algorithm::WeightedRoundRobin`] | smooth weighted round robin (nginx) | `Mutex<Vec<i64>>` |
//! | [`Algorithm::LeastConnections`] | minimises `active / weight`, weighted draw among ties | none |
//! | [`Algorithm::Random`] | power of two weighted-random choices | none |
//! | [`Algorithm::Maglev`] | weighted Maglev table keyed on client ip + port | immutable table |
//! | [`Algorithm::SourceHash`] | the same Maglev table keyed on client ip only | immutable table |
//!
//! A candidate is *usable* for a connection when its weight is non-zero, it
//! is eligible ([`PickCtx::eligible`]) and it is not excluded
//! ([`PickCtx::exclude`]). [`Selector::pick`] only ever returns usable
//! candidates, and returns `None` exactly when no candidate is usable.

mod maglev;

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

pub use maglev::MaglevTableView;
#[allow(unused_imports, reason = "the bench compiles this module alone")]
pub use maglev::is_prime;
use maglev::{MAX_MAGLEV_TABLE_SIZE, validate_table_size};

/// The backend selection algorithm of a pool. The config file's spellings of it
/// (`round_robin`, ...) live with the rest of the config's keywords (`config::types`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// Cycle over usable candidates in candidate order; weight is ignored
    /// except that weight 0 is never chosen. The default.
    #[default]
    RoundRobin,
    /// Smooth weighted round robin (the nginx algorithm): over any multiple
    /// of the sum of weights, starting from a fresh selector with every
    /// candidate usable, each candidate is chosen exactly `weight` times per
    /// `sum(weight)` picks, and heavy candidates are interleaved with light
    /// ones rather than chosen in bursts.
    WeightedRoundRobin,
    /// Weighted least connections: the usable candidate minimising
    /// `active / weight`; ties are broken by a weighted draw from [`PickCtx::random`].
    LeastConnections,
    /// Power of two choices: two weighted-random candidates drawn from
    /// [`PickCtx::random`], the one with the lower `active / weight` wins.
    Random,
    /// Weighted Maglev consistent hashing of the client address (ip and
    /// port).
    Maglev,
    /// Weighted Maglev consistent hashing of the client ip only, so every
    /// connection of one client lands on the same backend while it is
    /// usable.
    SourceHash,
}

/// One backend as selection sees it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Candidate {
    /// Stable identity of the backend, conventionally `"ip:port"`. Keys must
    /// be unique within one backend set; Maglev hashes them, so the same key
    /// always gets the same permutation whatever else is in the set.
    pub key: String,
    /// Relative share of new connections. `0` means never chosen.
    pub weight: u32,
}

/// Everything about one connection that selection may use.
///
/// The per-candidate slices are indexed like the `candidates` slice the
/// [`Selector`] was built from and should have the same length. A missing
/// `eligible` entry counts as not eligible and a missing `active` entry as
/// zero, so a short slice can never make `pick` panic.
#[derive(Clone, Copy, Debug)]
pub struct PickCtx<'a> {
    /// The client's address; Maglev hashes ip and port, source hash the ip
    /// only. IPv4-mapped IPv6 addresses are hashed as the IPv4 address.
    pub client: SocketAddr,
    /// Per candidate: may it take new connections now (up, not draining, not
    /// ejected)?
    pub eligible: &'a [bool],
    /// Per candidate: active connection count (least connections, random).
    pub active: &'a [u64],
    /// Candidates already tried for this connection; retries never reuse
    /// one. Out-of-range indices are ignored.
    pub exclude: &'a [usize],
    /// Caller-supplied random number (random's two choices, least
    /// connections' tie break). Ignored by the other algorithms.
    pub random: u64,
}

impl PickCtx<'_> {
    /// Eligible and not excluded (weight is checked by the selector).
    fn allows(&self, index: usize) -> bool {
        self.eligible.get(index).copied().unwrap_or(false) && !self.exclude.contains(&index)
    }

    fn active_of(&self, index: usize) -> u64 {
        self.active.get(index).copied().unwrap_or(0)
    }
}

/// Why a [`Selector`] could not be built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BalanceError {
    /// The Maglev table size is not a prime number (the permutation needs a
    /// prime so every skip is coprime with the size).
    TableSizeNotPrime(usize),
    /// The Maglev table size exceeds 2^24.
    TableSizeTooLarge(usize),
    /// Two candidates share this key.
    DuplicateKey(String),
    /// More candidates than a `u32` table entry can index.
    TooManyCandidates(usize),
}

impl fmt::Display for BalanceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BalanceError::TableSizeNotPrime(size) => {
                write!(f, "maglev table size {size} is not a prime number")
            }
            BalanceError::TableSizeTooLarge(size) => write!(
                f,
                "maglev table size {size} exceeds the maximum of {MAX_MAGLEV_TABLE_SIZE}"
            ),
            BalanceError::DuplicateKey(key) => {
                write!(f, "backend {key:?} appears more than once")
            }
            BalanceError::TooManyCandidates(count) => {
                write!(f, "{count} backends is more than selection supports")
            }
        }
    }
}

impl std::error::Error for BalanceError {}

/// Selection state for one backend set. Built once per backend-set change
/// and shared by all connection tasks (`Send + Sync`).
#[derive(Debug)]
pub struct Selector {
    weights: Vec<u32>,
    state: State,
}

#[derive(Debug)]
enum State {
    /// Ticket counter; the ticket modulo the number of usable candidates
    /// says which usable candidate is next.
    RoundRobin(AtomicUsize),
    /// nginx's `current_weight` per candidate. A plain mutex: it is held for
    /// one O(n) pass and never across an await.
    Smooth(Mutex<Vec<i64>>),
    LeastConnections,
    Random,
    Maglev {
        table: maglev::MaglevTable,
        /// Maglev hashes ip and port; source hash the ip only.
        with_port: bool,
    },
}

impl Selector {
    /// Builds the selector for `candidates` (indices returned by
    /// [`Selector::pick`] index this slice).
    ///
    /// `maglev_table_size` must be a prime no larger than 2^24. 65537 is a
    /// good default; the Maglev paper wants it well above 100 × the number
    /// of backends, and a larger table also moves fewer foreign slots when
    /// a backend is removed. It is validated for every algorithm, so a bad
    /// value is reported when the configuration is loaded rather than when
    /// the algorithm is switched.
    ///
    /// Keys must be unique. An empty candidate set (or one where every
    /// weight is 0) is valid: every pick then returns `None`.
    pub fn new(
        algorithm: Algorithm,
        candidates: &[Candidate],
        maglev_table_size: usize,
    ) -> Result<Selector, BalanceError> {
        validate_table_size(maglev_table_size)?;
        // Table entries are u32 candidate indices with u32::MAX as "empty".
        if u32::try_from(candidates.len()).map_or(true, |n| n == u32::MAX) {
            return Err(BalanceError::TooManyCandidates(candidates.len()));
        }
        let mut keys: Vec<&str> = candidates.iter().map(|c| c.key.as_str()).collect();
        keys.sort_unstable();
        if let Some(pair) = keys.windows(2).find(|pair| pair[0] == pair[1]) {
            return Err(BalanceError::DuplicateKey(pair[0].to_owned()));
        }

        let state = match algorithm {
            Algorithm::RoundRobin => State::RoundRobin(AtomicUsize::new(0)),
            Algorithm::WeightedRoundRobin => State::Smooth(Mutex::new(vec![0; candidates.len()])),
            Algorithm::LeastConnections => State::LeastConnections,
            Algorithm::Random => State::Random,
            Algorithm::Maglev | Algorithm::SourceHash => State::Maglev {
                table: maglev::MaglevTable::build(candidates, maglev_table_size),
                with_port: algorithm == Algorithm::Maglev,
            },
        };
        Ok(Selector {
            weights: candidates.iter().map(|c| c.weight).collect(),
            state,
        })
    }

    /// Chooses a candidate for one connection: an index into the
    /// `candidates` slice given to [`Selector::new`]. The result always has
    /// a non-zero weight, is eligible and is not excluded; `None` means no
    /// candidate is usable (the caller refuses the connection).
    ///
    /// Round robin and weighted round robin advance their state on every
    /// call that returns `Some`, retries included; that state starts afresh
    /// whenever the selector is rebuilt.
    pub fn pick(&self, ctx: &PickCtx<'_>) -> Option<usize> {
        let usable = |i: usize| self.weights[i] > 0 && ctx.allows(i);
        match &self.state {
            State::RoundRobin(next) => {
                let count = (0..self.weights.len()).filter(|&i| usable(i)).count();
                if count == 0 {
                    return None;
                }
                // Counting only usable candidates keeps the rotation even:
                // skipping a down candidate does not hand its turn to its
                // neighbour.
                let ticket = next.fetch_add(1, Ordering::Relaxed);
                (0..self.weights.len())
                    .filter(|&i| usable(i))
                    .nth(ticket % count)
            }
            State::Smooth(current) => self.pick_smooth(current, usable),
            State::LeastConnections => self.pick_least_connections(ctx, usable),
            State::Random => self.pick_two_choices(ctx, usable),
            State::Maglev { table, with_port } => {
                if !(0..self.weights.len()).any(usable) {
                    return None;
                }
                let hash = maglev::client_hash(ctx.client, *with_port);
                table
                    .lookup(hash, usable)
                    .or_else(|| table.fallback(hash, usable))
            }
        }
    }

    /// nginx smooth weighted round robin over the usable candidates. Unusable
    /// candidates neither gain `current` nor count towards `total`, so the
    /// usable ones keep exact shares among themselves.
    fn pick_smooth(
        &self,
        current: &Mutex<Vec<i64>>,
        usable: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        // The counters are plain integers that are valid after any partial
        // update, so a poisoned lock is still safe to use.
        let mut current = current.lock().unwrap_or_else(PoisonError::into_inner);
        let mut total: i64 = 0;
        let mut best: Option<usize> = None;
        for (i, &weight) in self.weights.iter().enumerate() {
            if !usable(i) {
                continue;
            }
            let weight = i64::from(weight);
            current[i] += weight;
            total += weight;
            // Strictly greater: ties go to the lowest index, which makes the
            // sequence fully determined by the weights.
            if best.is_none_or(|b| current[i] > current[b]) {
                best = Some(i);
            }
        }
        if let Some(b) = best {
            current[b] -= total;
        }
        best
    }

    /// Minimises `active / weight`, comparing by cross-multiplication in u128
    /// (no floats, no overflow). Ties are broken by a draw weighted by weight,
    /// so equally loaded candidates share the work in proportion to weight.
    fn pick_least_connections(
        &self,
        ctx: &PickCtx<'_>,
        usable: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        // Load is `active / weight`, compared by cross-multiplication. Ties (an idle pool, or
        // equal loads) are broken by a weighted draw from `ctx.random`, so an idle 3:1:1 pool
        // still shares 60/20/20 instead of sending everything to the heaviest backend.
        let load = |i: usize| (u128::from(ctx.active_of(i)), u128::from(self.weights[i]));
        let mut best: Option<(u128, u128)> = None;
        let mut tied_weight: u64 = 0;
        for i in (0..self.weights.len()).filter(|&i| usable(i)) {
            let (a, w) = load(i);
            match best {
                Some((ba, bw)) if a * bw > ba * w => {}
                Some((ba, bw)) if a * bw == ba * w => tied_weight += u64::from(self.weights[i]),
                _ => {
                    best = Some((a, w));
                    tied_weight = u64::from(self.weights[i]);
                }
            }
        }
        let (ba, bw) = best?;
        let mut ticket = ctx.random % tied_weight.max(1);
        let tied: Vec<usize> = (0..self.weights.len())
            .filter(|&i| usable(i))
            .filter(|&i| {
                let (a, w) = load(i);
                a * bw == ba * w
            })
            .collect();
        for &i in &tied {
            let w = u64::from(self.weights[i]);
            if ticket < w {
                return Some(i);
            }
            ticket -= w;
        }
        tied.last().copied()
    }

    /// Power of two choices. The two draws are the first two outputs of
    /// SplitMix64 seeded with `ctx.random`, so both are full 64-bit values
    /// even if the caller's number is a counter; each maps to a candidate
    /// with probability proportional to its weight. The second draw wins
    /// only with a strictly lower `active / weight`.
    fn pick_two_choices(&self, ctx: &PickCtx<'_>, usable: impl Fn(usize) -> bool) -> Option<usize> {
        let total: u64 = (0..self.weights.len())
            .filter(|&i| usable(i))
            .map(|i| u64::from(self.weights[i]))
            .sum();
        if total == 0 {
            return None;
        }
        let draw = |r: u64| -> Option<usize> {
            // Multiply-shift maps r uniformly onto 0..total.
            let mut target = ((u128::from(r) * u128::from(total)) >> 64) as u64;
            for i in (0..self.weights.len()).filter(|&i| usable(i)) {
                let weight = u64::from(self.weights[i]);
                if target < weight {
                    return Some(i);
                }
                target -= weight;
            }
            None
        };
        let seed = ctx.random;
        let first = draw(splitmix64(seed.wrapping_add(SPLITMIX_GAMMA)))?;
        let second = draw(splitmix64(
            seed.wrapping_add(SPLITMIX_GAMMA.wrapping_mul(2)),
        ))?;
        let cost = |i: usize| (u128::from(ctx.active_of(i)), u128::from(self.weights[i]));
        let (fa, fw) = cost(first);
        let (sa, sw) = cost(second);
        Some(if sa * fw < fa * sw { second } else { first })
    }

    /// Hex digest (32 hex digits) of the Maglev table, for `maglev` and
    /// `source_hash` (`None` for other algorithms). It covers the sorted keys
    /// of the backends in the table and every slot's owner by key, so it is
    /// the same whatever the order of the candidates and changes whenever a
    /// slot changes owner. Both hash algorithms share the table, so they
    /// report the same digest for the same backend set.
    #[allow(
        dead_code,
        reason = "for the admin API and logs; not every build calls it"
    )]
    pub fn maglev_digest(&self) -> Option<String> {
        match &self.state {
            State::Maglev { table, .. } => Some(table.digest()),
            _ => None,
        }
    }

    /// The Maglev table (`maglev` and `source_hash` only): one candidate
    /// index per slot, to be copied into an eBPF map.
    #[allow(
        dead_code,
        reason = "for the eBPF dataplanes; not every build calls it"
    )]
    pub fn maglev_table(&self) -> Option<MaglevTableView<'_>> {
        match &self.state {
            State::Maglev { table, with_port } => Some(table.view(*with_port)),
            _ => None,
        }
    }
}

/// SplitMix64's increment (2^64 / golden ratio).
const SPLITMIX_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function (Steele, Lea, Flood 2014).
fn splitmix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{IpAddr, Ipv4Addr};

    const ALL: [Algorithm; 6] = [
        Algorithm::RoundRobin,
        Algorithm::WeightedRoundRobin,
        Algorithm::LeastConnections,
        Algorithm::Random,
        Algorithm::Maglev,
        Algorithm::SourceHash,
    ];

    /// Small prime so per-case Maglev builds stay cheap in debug builds.
    const SMALL_TABLE: usize = 5003;

    /// Deterministic test PRNG.
    struct SplitMix(u64);

    impl SplitMix {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(SPLITMIX_GAMMA);
            splitmix64(self.0)
        }
    }

    fn candidates(weights: &[u32]) -> Vec<Candidate> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| Candidate {
                key: format!("10.0.{}.{}:80", i / 250, i % 250),
                weight,
            })
            .collect()
    }

    fn selector(algorithm: Algorithm, weights: &[u32]) -> Selector {
        Selector::new(algorithm, &candidates(weights), SMALL_TABLE)
            .unwrap_or_else(|e| panic!("building {algorithm:?}: {e}"))
    }

    fn client(rng: &mut SplitMix) -> SocketAddr {
        let bits = rng.next();
        SocketAddr::new(IpAddr::V4(Ipv4Addr::from((bits >> 16) as u32)), bits as u16)
    }

    fn ctx<'a>(
        eligible: &'a [bool],
        active: &'a [u64],
        client: SocketAddr,
        random: u64,
    ) -> PickCtx<'a> {
        PickCtx {
            client,
            eligible,
            active,
            exclude: &[],
            random,
        }
    }

    fn anywhere() -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], 1234))
    }

    /// Picks `n` times; `track` makes `active` count every pick (connections
    /// that never close), the load least connections and random react to.
    fn counts(sel: &Selector, weights: &[u32], n: usize, track: bool, seed: u64) -> Vec<u64> {
        let eligible = vec![true; weights.len()];
        let mut active = vec![0u64; weights.len()];
        let mut counts = vec![0u64; weights.len()];
        let mut rng = SplitMix(seed);
        for _ in 0..n {
            let addr = client(&mut rng);
            let random = rng.next();
            let i = sel
                .pick(&ctx(&eligible, &active, addr, random))
                .unwrap_or_else(|| panic!("picked nothing from {weights:?}"));
            counts[i] += 1;
            if track {
                active[i] += 1;
            }
        }
        counts
    }

    #[test]
    fn selector_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Selector>();
    }

    #[test]
    fn rejects_bad_table_sizes_and_duplicate_keys() {
        for size in [0, 1, 4, 65_536, 65_535] {
            assert_eq!(
                Selector::new(Algorithm::Maglev, &[], size).err(),
                Some(BalanceError::TableSizeNotPrime(size))
            );
        }
        assert_eq!(
            Selector::new(Algorithm::RoundRobin, &[], MAX_MAGLEV_TABLE_SIZE + 1).err(),
            Some(BalanceError::TableSizeTooLarge(MAX_MAGLEV_TABLE_SIZE + 1))
        );
        let mut dup = candidates(&[1, 1, 1]);
        dup[2].key = dup[0].key.clone();
        for algorithm in ALL {
            assert_eq!(
                Selector::new(algorithm, &dup, SMALL_TABLE).err(),
                Some(BalanceError::DuplicateKey(dup[0].key.clone()))
            );
        }
        assert_eq!(
            BalanceError::TableSizeNotPrime(4).to_string(),
            "maglev table size 4 is not a prime number"
        );
    }

    #[test]
    fn round_robin_cycles_over_usable_candidates_ignoring_weight() {
        let sel = selector(Algorithm::RoundRobin, &[5, 1, 0, 2]);
        let eligible = [true; 4];
        let seq: Vec<_> = (0..6)
            .filter_map(|_| sel.pick(&ctx(&eligible, &[], anywhere(), 0)))
            .collect();
        assert_eq!(seq, [0, 1, 3, 0, 1, 3]);
        // A down candidate's turn is not handed to its neighbour: the two
        // remaining candidates alternate.
        let eligible = [true, false, true, true];
        let mut c = [0u32; 4];
        for _ in 0..100 {
            if let Some(i) = sel.pick(&ctx(&eligible, &[], anywhere(), 0)) {
                c[i] += 1;
            }
        }
        assert_eq!(c, [50, 0, 0, 50]);
    }

    /// Smooth WRR for weights 5:1:1 (a, b, c) repeats exactly the period
    /// `a a b a c a a` (ties go to the lower index): within a period `a`
    /// never runs more than twice in a row; in the continuous stream the
    /// period's trailing `a a` meets the next period's leading `a a`, so
    /// the longest run is 4 (plain WRR would give runs of 5).
    #[test]
    fn smooth_wrr_interleaves_5_1_1_exactly() {
        let sel = selector(Algorithm::WeightedRoundRobin, &[5, 1, 1]);
        let eligible = [true; 3];
        let seq: Vec<_> = (0..21)
            .filter_map(|_| sel.pick(&ctx(&eligible, &[], anywhere(), 0)))
            .collect();
        let period = [0, 0, 1, 0, 2, 0, 0];
        assert_eq!(seq, period.repeat(3));
        let longest_run = |s: &[usize]| {
            s.chunk_by(|a, b| a == b)
                .map(<[usize]>::len)
                .max()
                .unwrap_or(0)
        };
        for period in seq.chunks(7) {
            assert_eq!(longest_run(period), 2);
        }
        assert_eq!(longest_run(&seq), 4);
    }

    /// Exact shares over every period of sum(weights) picks.
    fn assert_smooth_exact(weights: &[u32], periods: usize) {
        let sel = selector(Algorithm::WeightedRoundRobin, weights);
        let eligible = vec![true; weights.len()];
        let total: u32 = weights.iter().sum();
        for period in 0..periods {
            let mut c = vec![0u32; weights.len()];
            for _ in 0..total {
                let i = sel
                    .pick(&ctx(&eligible, &[], anywhere(), 0))
                    .unwrap_or_else(|| panic!("nothing picked"));
                c[i] += 1;
            }
            assert_eq!(c, weights, "period {period}");
        }
    }

    #[test]
    fn smooth_wrr_exact_shares_table_driven() {
        let cases: &[&[u32]] = &[
            &[1],
            &[5, 1, 1],
            &[1, 1, 1, 1],
            &[3, 2],
            &[10, 0, 7, 1],
            &[100, 1],
        ];
        for weights in cases {
            assert_smooth_exact(weights, 3);
        }
    }

    /// An ineligible candidate is skipped without disturbing the others:
    /// 5:1:1 with c down behaves exactly as 5:1, and once c is back the
    /// pool returns to exact 5:1:1 periods.
    #[test]
    fn smooth_wrr_skips_ineligible_without_corrupting_shares() {
        let sel = selector(Algorithm::WeightedRoundRobin, &[5, 1, 1]);
        let without_c = [true, true, false];
        let seq: Vec<_> = (0..12)
            .filter_map(|_| sel.pick(&ctx(&without_c, &[], anywhere(), 0)))
            .collect();
        assert_eq!(seq, [0, 0, 0, 1, 0, 0].repeat(2));
        let all = [true; 3];
        let seq: Vec<_> = (0..14)
            .filter_map(|_| sel.pick(&ctx(&all, &[], anywhere(), 0)))
            .collect();
        assert_eq!(seq, [0, 0, 1, 0, 2, 0, 0].repeat(2));
    }

    /// Over 10^5 picks every weighted algorithm gives each candidate a share
    /// within 1% (absolute) of weight / sum(weights). Least connections and
    /// random are driven by a growing `active` (or none, for random); WRR is
    /// exact; Maglev is fed random clients.
    #[test]
    fn shares_follow_weights() {
        const PICKS: usize = 100_000;
        let cases: &[(Algorithm, bool, &[u32])] = &[
            (Algorithm::WeightedRoundRobin, false, &[5, 3, 1, 1]),
            (Algorithm::LeastConnections, true, &[5, 3, 1, 1]),
            (Algorithm::LeastConnections, true, &[1, 1, 1, 1, 1]),
            (Algorithm::Random, false, &[5, 3, 1, 1]),
            (Algorithm::Random, true, &[5, 3, 1, 1]),
            (Algorithm::Random, false, &[1, 10, 0, 2]),
            (Algorithm::Maglev, false, &[5, 3, 1, 1]),
            (Algorithm::SourceHash, false, &[5, 3, 1, 1]),
            (Algorithm::RoundRobin, false, &[1, 1, 1]),
        ];
        for &(algorithm, track, weights) in cases {
            let sel = selector(algorithm, weights);
            let c = counts(&sel, weights, PICKS, track, 99);
            let total: u32 = weights.iter().sum();
            for (i, &w) in weights.iter().enumerate() {
                let want = f64::from(w) / f64::from(total);
                let got = c[i] as f64 / PICKS as f64;
                assert!(
                    (got - want).abs() <= 0.01,
                    "{algorithm} track={track} {weights:?}: candidate {i} got {got:.4}, want {want:.4}"
                );
            }
            if algorithm == Algorithm::WeightedRoundRobin {
                // 10^5 is a multiple of 10: exact.
                let exact: Vec<u64> = weights
                    .iter()
                    .map(|&w| PICKS as u64 * u64::from(w) / u64::from(total))
                    .collect();
                assert_eq!(c, exact);
            }
        }
    }

    #[test]
    fn least_connections_prefers_lowest_weighted_load_and_rotates_ties() {
        let sel = selector(Algorithm::LeastConnections, &[2, 1, 1]);
        let eligible = [true; 3];
        // 4/2 = 2 vs 1/1 = 1 vs 3/1 = 3: candidate 1.
        assert_eq!(
            sel.pick(&ctx(&eligible, &[4, 1, 3], anywhere(), 0)),
            Some(1)
        );
        // 2/2 = 1 ties with 1/1; the draw is weighted 2:1 by the random value.
        let picks: Vec<_> = (0..6)
            .filter_map(|r| sel.pick(&ctx(&eligible, &[2, 1, 3], anywhere(), r)))
            .collect();
        assert_eq!(picks, [0, 0, 1, 0, 0, 1]);
        // An idle pool shares by weight: 2:1:1.
        let picks: Vec<_> = (0..4)
            .filter_map(|r| sel.pick(&ctx(&eligible, &[0, 0, 0], anywhere(), r)))
            .collect();
        assert_eq!(picks, [0, 0, 1, 2]);
        // Extreme values do not overflow.
        let sel = selector(Algorithm::LeastConnections, &[u32::MAX, 1]);
        assert_eq!(
            sel.pick(&ctx(
                &eligible[..2],
                &[u64::MAX, u64::MAX - 1],
                anywhere(),
                0
            )),
            Some(0)
        );
    }

    #[test]
    fn random_takes_the_less_loaded_of_two() {
        let sel = selector(Algorithm::Random, &[1, 1]);
        let eligible = [true; 2];
        let mut rng = SplitMix(5);
        // Whenever both choices differ, the idle one wins; the loaded one
        // is only returned when both draws hit it (about 1 in 4).
        let loaded = (0..10_000)
            .filter(|_| sel.pick(&ctx(&eligible, &[100, 0], anywhere(), rng.next())) == Some(0))
            .count();
        assert!((2_000..3_000).contains(&loaded), "{loaded}");
    }

    #[test]
    fn source_hash_ignores_the_port_and_maglev_does_not() {
        let weights = [1; 10];
        let hash = selector(Algorithm::SourceHash, &weights);
        let maglev = selector(Algorithm::Maglev, &weights);
        let eligible = [true; 10];
        let mut rng = SplitMix(11);
        for _ in 0..200 {
            let ip = client(&mut rng).ip();
            let first = hash.pick(&ctx(&eligible, &[], SocketAddr::new(ip, 1), 0));
            assert!(first.is_some());
            for port in [2, 80, 443, 40_000, 65_535] {
                let addr = SocketAddr::new(ip, port);
                assert_eq!(hash.pick(&ctx(&eligible, &[], addr, rng.next())), first);
            }
        }
        // Maglev keys on the port too: one ip's connections spread.
        let ip = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 9));
        let spread: std::collections::HashSet<_> = (0..100)
            .filter_map(|port| maglev.pick(&ctx(&eligible, &[], SocketAddr::new(ip, port), 0)))
            .collect();
        assert!(spread.len() > 5, "{spread:?}");
    }

    /// When a backend becomes unusable only its own clients move; every
    /// other client keeps its backend, for both hash algorithms.
    #[test]
    fn hashing_moves_only_clients_of_unusable_backends() {
        for algorithm in [Algorithm::Maglev, Algorithm::SourceHash] {
            let sel = selector(algorithm, &[1, 2, 3, 4]);
            let all = [true; 4];
            let without_2 = [true, true, false, true];
            let mut rng = SplitMix(3);
            for _ in 0..2_000 {
                let addr = client(&mut rng);
                let before = sel.pick(&ctx(&all, &[], addr, 0));
                let after = sel.pick(&ctx(&without_2, &[], addr, 0));
                if before != Some(2) {
                    assert_eq!(before, after, "{algorithm} {addr}");
                } else {
                    assert!(after.is_some_and(|i| i != 2));
                }
                // A retry excluding the first answer gets a different one.
                let retry = sel.pick(&PickCtx {
                    exclude: before.as_slice(),
                    ..ctx(&all, &[], addr, 0)
                });
                assert!(retry.is_some() && retry != before);
            }
        }
    }

    #[test]
    fn maglev_digest_and_table_only_for_hash_algorithms() {
        let weights = [3, 1, 0, 2];
        for algorithm in ALL {
            let sel = selector(algorithm, &weights);
            let hashing = matches!(algorithm, Algorithm::Maglev | Algorithm::SourceHash);
            assert_eq!(sel.maglev_digest().is_some(), hashing, "{algorithm}");
            assert_eq!(sel.maglev_table().is_some(), hashing, "{algorithm}");
        }
        let maglev = selector(Algorithm::Maglev, &weights);
        let source = selector(Algorithm::SourceHash, &weights);
        // One table, two lookups.
        assert_eq!(maglev.maglev_digest(), source.maglev_digest());
        let view = maglev.maglev_table().unwrap_or_else(|| unreachable!());
        assert_eq!(view.entries().len(), SMALL_TABLE);
        assert!(
            view.entries()
                .iter()
                .all(|&e| e != 2 && (e as usize) < weights.len())
        );
        // The view's slot is where the lookup starts.
        let addr = anywhere();
        let slot = view.slot_for(addr).unwrap_or_else(|| unreachable!());
        assert_eq!(
            maglev.pick(&ctx(&[true; 4], &[], addr, 0)),
            Some(view.entries()[slot] as usize)
        );
        let empty = selector(Algorithm::Maglev, &[]);
        assert!(empty.maglev_table().is_some_and(|v| v.entries().is_empty()));
        assert_eq!(empty.pick(&ctx(&[], &[], addr, 0)), None);
    }

    #[test]
    fn nothing_usable_gives_none_for_every_algorithm() {
        let cases: &[(&[u32], &[bool], &[usize])] = &[
            (&[], &[], &[]),
            (&[0, 0], &[true, true], &[]),
            (&[1, 1], &[false, false], &[]),
            (&[1, 1], &[true, true], &[0, 1]),
            (&[1, 0, 1], &[false, true, true], &[2]),
            // Short slices: missing `eligible` entries count as ineligible.
            (&[1, 1], &[], &[]),
        ];
        for algorithm in ALL {
            for &(weights, eligible, exclude) in cases {
                let sel = selector(algorithm, weights);
                let pick = sel.pick(&PickCtx {
                    exclude,
                    ..ctx(eligible, &[], anywhere(), 7)
                });
                assert_eq!(
                    pick, None,
                    "{algorithm} {weights:?} {eligible:?} {exclude:?}"
                );
            }
        }
    }

    proptest! {
        // No regression files: the tests must not write into the source tree.
        #![proptest_config(ProptestConfig {
            cases: 200,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        /// Every algorithm returns only usable candidates (non-zero weight,
        /// eligible, not excluded), and returns `None` exactly when none is.
        #[test]
        fn picks_honour_weight_eligibility_and_exclusion(
            algorithm in prop::sample::select(ALL.to_vec()),
            rows in prop::collection::vec((0u32..=3, any::<bool>(), any::<bool>(), 0u64..5), 0..12),
            seed in any::<u64>(),
        ) {
            let weights: Vec<u32> = rows.iter().map(|r| r.0).collect();
            let eligible: Vec<bool> = rows.iter().map(|r| r.1).collect();
            let exclude: Vec<usize> = (0..rows.len()).filter(|&i| rows[i].2).collect();
            let active: Vec<u64> = rows.iter().map(|r| r.3).collect();
            let usable = |i: usize| weights[i] > 0 && eligible[i] && !exclude.contains(&i);
            let any_usable = (0..rows.len()).any(usable);
            let sel = selector(algorithm, &weights);
            let mut rng = SplitMix(seed);
            for _ in 0..20 {
                let pick = sel.pick(&PickCtx {
                    client: client(&mut rng),
                    eligible: &eligible,
                    active: &active,
                    exclude: &exclude,
                    random: rng.next(),
                });
                match pick {
                    Some(i) => prop_assert!(usable(i), "{} picked {} of {:?}", algorithm, i, rows),
                    None => prop_assert!(!any_usable, "{} picked nothing from {:?}", algorithm, rows),
                }
            }
        }

        /// Smooth WRR gives exact shares over every period for any weights.
        #[test]
        fn smooth_wrr_exact_for_random_weights(weights in prop::collection::vec(1u32..=20, 1..=10)) {
            assert_smooth_exact(&weights, 3);
        }

        /// Selector-level permutation invariance of the Maglev digest.
        #[test]
        fn digest_is_independent_of_input_order(
            (original, shuffled) in prop::collection::vec(0u32..=5, 0..=12)
                .prop_map(|weights| candidates(&weights))
                .prop_flat_map(|cands| (Just(cands.clone()), Just(cands).prop_shuffle()))
        ) {
            let a = Selector::new(Algorithm::SourceHash, &original, SMALL_TABLE)?;
            let b = Selector::new(Algorithm::SourceHash, &shuffled, SMALL_TABLE)?;
            prop_assert_eq!(a.maglev_digest(), b.maglev_digest());
        }
    }
}
