//! Weighted Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and
//! Reliable Software Network Load Balancer", NSDI 2016), shared by the
//! `maglev` and `source_hash` algorithms.
//!
//! Build: each backend with non-zero weight gets a permutation of the `M`
//! table slots, `offset = h1(key) % M`, `skip = h2(key) % (M - 1) + 1`,
//! slot `j` of its permutation is `(offset + j * skip) % M` (u64
//! arithmetic; `M` prime makes every skip a full cycle). Backends take turns
//! claiming the next free slot of their permutation, in passes: a backend
//! of the largest weight takes a turn in every pass, one of weight `w` in
//! `w` out of every `max_weight` passes, spread evenly; within a pass turns
//! go in key order. With equal weights this is exactly the paper's
//! round-robin fill. Each backend stops at its quota, `floor(M * w / W)`
//! plus one for the backends with the largest remainders, so it ends with
//! exactly its quota: within one slot of `M * w / W`. Backends are ordered
//! by key before anything else, so the table depends only on the set of
//! `(key, weight)` pairs, never on the order they were given in. Candidates
//! of weight 0 are left out and do not change the table.
//!
//! Lookup: `client_hash % M` is the preferred slot; when its owner is not
//! usable (down, excluded) the following slots are tried in order, which
//! moves only the clients of unusable backends and spreads them over the
//! others in proportion to their slots. Health changes therefore never
//! rebuild the table; only a change of the backend set or weights does.
//!
//! Disruption: removing one backend of N moves its own slots plus, through
//! the permutations' races, some foreign ones: with M = 65537 on average
//! 0.3% of M at N = 10 and 0.6% at N = 100, but not bounded; correlated
//! permutations (two keys with the same skip, ~7% likely among 100 keys)
//! occasionally push it past 1% (worst measured 2.9%). A larger M shrinks
//! it (M = 655373: worst measured 0.2% for N <= 100).
//!
//! All hashes are SipHash-2-4 (the reference SipHash, stable by
//! specification) with fixed keys defined below. Changing a key, the byte
//! layouts or the turn order reshuffles every deployed table.

use std::net::{IpAddr, SocketAddr};

use siphasher::sip::SipHasher24;
use siphasher::sip128::SipHasher24 as SipHasher24x128;

use super::{BalanceError, Candidate};

/// Largest accepted table size (2^24 slots, 64 MiB of `u32`); the largest
/// prime accepted is 16_777_213.
pub(super) const MAX_MAGLEV_TABLE_SIZE: usize = 1 << 24;

/// SipHash keys. Arbitrary fixed constants; they are part of the table
/// format (see the module doc).
const OFFSET_KEYS: (u64, u64) = (0x6c62_2d6d_6167_6c65, 0x762d_6f66_6673_6574);
const SKIP_KEYS: (u64, u64) = (0x6c62_2d6d_6167_6c65, 0x762d_736b_6970_2d31);
const FALLBACK_KEYS: (u64, u64) = (0x6c62_2d6d_6167_6c65, 0x762d_6661_6c6c_6261);
const DIGEST_KEYS: (u64, u64) = (0x6c62_2d6d_6167_6c65, 0x762d_6469_6765_7374);

/// Marks a slot not yet claimed during the build.
const EMPTY: u32 = u32::MAX;

/// Whether `n` is prime (trial division; `n <= MAX_MAGLEV_TABLE_SIZE` takes
/// at most ~2000 divisions).
pub fn is_prime(n: usize) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) {
        return false;
    }
    let mut d = 3;
    while d <= n / d {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// Checks a Maglev table size: prime and at most [`MAX_MAGLEV_TABLE_SIZE`].
pub(super) fn validate_table_size(size: usize) -> Result<(), BalanceError> {
    if size > MAX_MAGLEV_TABLE_SIZE {
        Err(BalanceError::TableSizeTooLarge(size))
    } else if !is_prime(size) {
        Err(BalanceError::TableSizeNotPrime(size))
    } else {
        Ok(())
    }
}

/// Hash of a client address for the table lookup: SipHash-2-4 over the ip's
/// octets (4 for IPv4, including IPv4-mapped IPv6, 16 for IPv6) followed,
/// when `with_port`, by the port in network byte order. One definition for the
/// daemon and the XDP program: `lb_common::sip`, which the kernel side calls with
/// the words it loads from the packet.
pub(super) fn client_hash(client: SocketAddr, with_port: bool) -> u64 {
    // The words as a little-endian load from the packet gives them.
    let port = u16::from_le_bytes(client.port().to_be_bytes());
    // Canonical form: a dual-stack listener reports IPv4 clients as
    // ::ffff:a.b.c.d, and they must map like the same client seen over IPv4.
    match client.ip().to_canonical() {
        IpAddr::V4(v4) => {
            lb_common::sip::client_v4(u32::from_le_bytes(v4.octets()), port, with_port)
        }
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let word = |i: usize| u32::from_le_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            lb_common::sip::client_v6([word(0), word(4), word(8), word(12)], port, with_port)
        }
    }
}

fn sip(keys: (u64, u64), bytes: &[u8]) -> u64 {
    SipHasher24::new_with_keys(keys.0, keys.1).hash(bytes)
}

/// Read-only view of a built Maglev table.
#[allow(dead_code, reason = "for the eBPF dataplanes; not every build uses it")]
#[derive(Clone, Copy, Debug)]
pub struct MaglevTableView<'a> {
    entries: &'a [u32],
    with_port: bool,
}

#[allow(dead_code, reason = "for the eBPF dataplanes; not every build uses it")]
impl<'a> MaglevTableView<'a> {
    /// One entry per slot: the index, in the original candidates slice, of
    /// the slot's owner. Empty when no candidate has a non-zero weight;
    /// otherwise its length is the table size.
    pub fn entries(&self) -> &'a [u32] {
        self.entries
    }

    /// The slot a client's lookup starts at (`None` for an empty table);
    /// lets another implementation of the lookup (eBPF) be checked against
    /// this one.
    pub fn slot_for(&self, client: SocketAddr) -> Option<usize> {
        if self.entries.is_empty() {
            return None;
        }
        let size = self.entries.len() as u64;
        Some((client_hash(client, self.with_port) % size) as usize)
    }
}

/// A built table plus what the digest and the fallback need.
#[derive(Debug)]
pub(super) struct MaglevTable {
    /// Slot -> index into the original candidates slice.
    entries: Vec<u32>,
    /// Original index -> rank in key order (`EMPTY` for weight 0), so the
    /// digest can describe slots by key rather than by input position.
    rank_of: Vec<u32>,
    /// Keys of the backends in the table, in key order.
    sorted_keys: Vec<String>,
    size: usize,
}

/// A backend taking turns during the build.
struct Runner {
    /// Next position of its permutation.
    next: u64,
    skip: u64,
    weight: u64,
    /// Turn credit; a turn costs `max_weight`.
    credit: u64,
    /// Slots still to claim before reaching its quota.
    left: u64,
    /// Index into the original candidates slice.
    index: u32,
}

impl MaglevTable {
    /// Builds the table. `size` must already be validated (prime, at most
    /// [`MAX_MAGLEV_TABLE_SIZE`]) and keys must be unique.
    pub(super) fn build(candidates: &[Candidate], size: usize) -> MaglevTable {
        let mut order: Vec<usize> = (0..candidates.len())
            .filter(|&i| candidates[i].weight > 0)
            .collect();
        order.sort_unstable_by(|&a, &b| candidates[a].key.cmp(&candidates[b].key));

        let mut rank_of = vec![EMPTY; candidates.len()];
        for (rank, &i) in order.iter().enumerate() {
            rank_of[i] = rank as u32;
        }
        let sorted_keys: Vec<String> = order.iter().map(|&i| candidates[i].key.clone()).collect();
        if order.is_empty() {
            return MaglevTable {
                entries: Vec::new(),
                rank_of,
                sorted_keys,
                size,
            };
        }

        let m = size as u64;
        let weights: Vec<u64> = order
            .iter()
            .map(|&i| u64::from(candidates[i].weight))
            .collect();
        let quotas = quotas(&weights, m);

        // Backends still filling, in key order, with everything the passes
        // touch kept together.
        let mut active: Vec<Runner> = order
            .iter()
            .enumerate()
            .filter(|&(rank, _)| quotas[rank] > 0)
            .map(|(rank, &i)| {
                let key = candidates[i].key.as_bytes();
                Runner {
                    next: sip(OFFSET_KEYS, key) % m,
                    // m == 2 gives skip 1, which is still a full cycle.
                    skip: sip(SKIP_KEYS, key) % (m - 1) + 1,
                    weight: weights[rank],
                    credit: 0,
                    left: quotas[rank],
                    index: i as u32,
                }
            })
            .collect();

        let mut entries = vec![EMPTY; size];
        // Occupancy bitmap: M = 65537 needs 8 KiB, which stays in L1 while
        // the probes jump around; the u32 table (256 KiB) is only written.
        let mut taken = vec![0u64; size.div_ceil(64)];

        // Turns come in passes. Before each pass every backend earns
        // `weight` credit per pass elapsed; in the pass every backend whose
        // credit has reached `max_weight` takes one turn, in key order. So
        // the heaviest backends take a turn every pass and a backend of
        // weight w takes w turns per `max_weight` passes, interleaved rather
        // than in bursts. Every backend starts with a full credit, so each
        // takes a turn in the first pass, as in unweighted Maglev. Passes in
        // which no backend can be due are skipped in one step.
        //
        // Quotas sum to M, so the passes end exactly when the table is full,
        // and while it is not full every backend's permutation still has a
        // free slot ahead of it (a slot passed over was already taken and
        // stays taken), so the probe loop terminates.
        let max_weight = weights.iter().copied().max().unwrap_or(1);
        for runner in &mut active {
            runner.credit = max_weight;
        }
        // Passes elapsed since the previous pass that was run.
        let mut passes: u64 = 0;
        while !active.is_empty() {
            let mut passes_to_next_turn = u64::MAX;
            let mut capped = false;
            for runner in &mut active {
                runner.credit += passes * runner.weight;
                if runner.credit >= max_weight {
                    runner.credit -= max_weight;
                    loop {
                        let slot = runner.next as usize;
                        runner.next += runner.skip;
                        if runner.next >= m {
                            runner.next -= m;
                        }
                        let (word, bit) = (slot / 64, 1u64 << (slot % 64));
                        if taken[word] & bit == 0 {
                            taken[word] |= bit;
                            entries[slot] = runner.index;
                            break;
                        }
                    }
                    runner.left -= 1;
                    capped |= runner.left == 0;
                }
                // credit < max_weight here; passes until it is >= again.
                // The division is only needed while no backend is due in
                // the very next pass (the usual case has one that is).
                if passes_to_next_turn > 1 {
                    let due = if runner.credit + runner.weight >= max_weight {
                        1
                    } else {
                        (max_weight - runner.credit).div_ceil(runner.weight)
                    };
                    passes_to_next_turn = passes_to_next_turn.min(due);
                }
            }
            if capped {
                active.retain(|runner| runner.left > 0);
            }
            // At most each backend's own `due`, so every credit stays below
            // max_weight + weight < 2^33.
            passes = passes_to_next_turn;
        }
        debug_assert!(entries.iter().all(|&e| e != EMPTY));

        MaglevTable {
            entries,
            rank_of,
            sorted_keys,
            size,
        }
    }

    /// First usable owner walking the table from the client's slot, or
    /// `None` if no slot's owner is usable.
    pub(super) fn lookup(&self, hash: u64, usable: impl Fn(usize) -> bool) -> Option<usize> {
        if self.entries.is_empty() {
            return None;
        }
        let len = self.entries.len();
        let start = (hash % len as u64) as usize;
        self.entries[start..]
            .iter()
            .chain(&self.entries[..start])
            .map(|&e| e as usize)
            .find(|&i| usable(i))
    }

    /// Used only when no usable candidate owns a slot (possible when a
    /// weight is tiny relative to the total, so its quota is 0): rendezvous
    /// hashing over the usable candidates, so the answer is still
    /// deterministic per client and independent of input order.
    pub(super) fn fallback(&self, hash: u64, usable: impl Fn(usize) -> bool) -> Option<usize> {
        let hash = hash.to_le_bytes();
        (0..self.rank_of.len())
            .filter(|&i| usable(i) && self.rank_of[i] != EMPTY)
            .max_by_key(|&i| {
                let key = self.sorted_keys[self.rank_of[i] as usize].as_bytes();
                let mut bytes = Vec::with_capacity(key.len() + 8);
                bytes.extend_from_slice(&hash);
                bytes.extend_from_slice(key);
                sip(FALLBACK_KEYS, &bytes)
            })
    }

    /// SipHash-2-4-128 over: `"lb-maglev-v1"`, the table size and the number
    /// of backends (u64 LE each), each key in key order (u64 LE length, then
    /// the bytes), then each slot's owner as its rank in key order (u32 LE).
    /// Rendered as 32 lowercase hex digits.
    pub(super) fn digest(&self) -> String {
        let key_bytes: usize = self.sorted_keys.iter().map(|k| k.len() + 8).sum();
        let mut bytes = Vec::with_capacity(28 + key_bytes + 4 * self.entries.len());
        bytes.extend_from_slice(b"lb-maglev-v1");
        bytes.extend_from_slice(&(self.size as u64).to_le_bytes());
        bytes.extend_from_slice(&(self.sorted_keys.len() as u64).to_le_bytes());
        for key in &self.sorted_keys {
            bytes.extend_from_slice(&(key.len() as u64).to_le_bytes());
            bytes.extend_from_slice(key.as_bytes());
        }
        for &owner in &self.entries {
            bytes.extend_from_slice(&self.rank_of[owner as usize].to_le_bytes());
        }
        let hash = SipHasher24x128::new_with_keys(DIGEST_KEYS.0, DIGEST_KEYS.1).hash(&bytes);
        hash.as_bytes().iter().map(|b| format!("{b:02x}")).collect()
    }

    pub(super) fn view(&self, with_port: bool) -> MaglevTableView<'_> {
        MaglevTableView {
            entries: &self.entries,
            with_port,
        }
    }
}

/// Largest-remainder apportionment of `m` slots by weight: every quota is
/// `floor(m * w / W)` or one more, and they sum to `m`. Remainder ties go to
/// the lower rank (key order), keeping the result order-independent.
fn quotas(weights: &[u64], m: u64) -> Vec<u64> {
    let total: u128 = weights.iter().map(|&w| u128::from(w)).sum();
    let m = u128::from(m);
    let mut quotas: Vec<u64> = weights
        .iter()
        .map(|&w| (m * u128::from(w) / total) as u64)
        .collect();
    let assigned: u64 = quotas.iter().sum();
    let leftover = (m as u64 - assigned) as usize;
    let mut by_remainder: Vec<(u128, usize)> = weights
        .iter()
        .enumerate()
        .map(|(rank, &w)| (m * u128::from(w) % total, rank))
        .collect();
    by_remainder.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(_, rank) in by_remainder.iter().take(leftover) {
        quotas[rank] += 1;
    }
    quotas
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The production default table size.
    const DEFAULT_MAGLEV_TABLE_SIZE: usize = 65_537;

    /// Candidates `10.<i/250>.<i%250>.1:8080` with the given weights.
    fn candidates(weights: &[u32]) -> Vec<Candidate> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| Candidate {
                key: format!("10.{}.{}.1:8080", i / 250, i % 250),
                weight,
            })
            .collect()
    }

    /// Slot owners by key, comparable across differently ordered inputs.
    fn owners_by_key(table: &MaglevTable, candidates: &[Candidate]) -> Vec<String> {
        table
            .entries
            .iter()
            .map(|&e| candidates[e as usize].key.clone())
            .collect()
    }

    fn splitmix_weights(seed: u64, n: usize, max: u64) -> Vec<u32> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state = state.wrapping_add(super::super::SPLITMIX_GAMMA);
                (super::super::splitmix64(state) % max + 1) as u32
            })
            .collect()
    }

    /// Every backend owns `floor(M*w/W)` or `ceil(M*w/W)` slots.
    fn assert_quotas(weights: &[u32], m: usize) {
        let table = MaglevTable::build(&candidates(weights), m);
        assert_eq!(table.entries.len(), m);
        let mut counts = vec![0u64; weights.len()];
        for &e in &table.entries {
            counts[e as usize] += 1;
        }
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        for (i, &w) in weights.iter().enumerate() {
            let exact = m as u64 * u64::from(w);
            let floor = exact / total;
            let ceil = exact.div_ceil(total);
            assert!(
                (floor..=ceil).contains(&counts[i]),
                "backend {i} weight {w}: {} slots, expected {floor}..={ceil} (weights {weights:?}, M {m})",
                counts[i]
            );
        }
    }

    #[test]
    fn primes() {
        let cases = [
            (0, false),
            (1, false),
            (2, true),
            (3, true),
            (4, false),
            (9, false),
            (25, false),
            (5003, true),
            (65_537, true),
            (65_535, false),
            (16_777_213, true),
            (16_777_215, false),
        ];
        for (n, prime) in cases {
            assert_eq!(is_prime(n), prime, "{n}");
        }
        assert_eq!(validate_table_size(65_537), Ok(()));
        assert_eq!(
            validate_table_size(65_536),
            Err(BalanceError::TableSizeNotPrime(65_536))
        );
        assert_eq!(
            validate_table_size(16_777_259),
            Err(BalanceError::TableSizeTooLarge(16_777_259))
        );
    }

    #[test]
    fn quotas_table_driven() {
        let cases: &[(&[u32], usize)] = &[
            (&[1], 2),
            (&[1, 1], 2),
            (&[1, 1, 1], 2), // more backends than slots: one gets none
            (&[1, 1, 1], 5003),
            (&[5, 1, 1], 65_537),
            (&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 65_537),
            (&[u32::MAX, 1, u32::MAX - 1], 5003),
        ];
        for &(weights, m) in cases {
            assert_quotas(weights, m);
        }
        assert_quotas(&[1; 100], 65_537);
        assert_quotas(&splitmix_weights(7, 100, 10), 65_537);
    }

    #[test]
    fn empty_and_zero_weight_sets_give_an_empty_table() {
        for weights in [&[][..], &[0, 0][..]] {
            let table = MaglevTable::build(&candidates(weights), 5003);
            assert!(table.entries.is_empty());
            assert_eq!(table.lookup(42, |_| true), None);
            assert_eq!(table.fallback(42, |_| true), None);
            assert_eq!(table.digest().len(), 32);
        }
    }

    /// Zero-weight candidates are not in the table and do not change it.
    #[test]
    fn zero_weight_candidates_do_not_change_the_table() {
        let with = MaglevTable::build(&candidates(&[3, 0, 2, 0]), 5003);
        let without_cands = vec![
            candidates(&[3, 0, 2])[0].clone(),
            candidates(&[3, 0, 2])[2].clone(),
        ];
        let without = MaglevTable::build(&without_cands, 5003);
        assert_eq!(
            owners_by_key(&with, &candidates(&[3, 0, 2, 0])),
            owners_by_key(&without, &without_cands)
        );
        assert_eq!(with.digest(), without.digest());
    }

    /// Removing one backend: slots of other backends that change owner stay
    /// under 1% of M, and everything moved stays under w/W + 1% (1/N + 1%
    /// for equal weights).
    fn assert_small_disruption(weights: &[u32], removed: usize, m: usize) {
        let before_cands = candidates(weights);
        let mut after_cands = before_cands.clone();
        after_cands.remove(removed);
        let before = owners_by_key(&MaglevTable::build(&before_cands, m), &before_cands);
        let after = owners_by_key(&MaglevTable::build(&after_cands, m), &after_cands);
        let removed_key = &before_cands[removed].key;
        let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        let stray = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| b != a && *b != removed_key)
            .count();
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        let share = f64::from(weights[removed]) / total as f64;
        let m = m as f64;
        assert!(
            (stray as f64) / m <= 0.01,
            "stray {stray} slots ({:.3}%) weights {weights:?} removed {removed}",
            100.0 * stray as f64 / m
        );
        assert!(
            (moved as f64) / m <= share + 0.01,
            "moved {moved} slots, share {share} weights {weights:?} removed {removed}"
        );
    }

    #[test]
    fn removing_one_backend_moves_little_table_driven() {
        for n in [2usize, 3, 5, 10, 37, 100] {
            let equal = vec![1; n];
            for removed in [0, n / 2, n - 1] {
                assert_small_disruption(&equal, removed, DEFAULT_MAGLEV_TABLE_SIZE);
            }
        }
        for seed in 0..4 {
            let weights = splitmix_weights(seed, 20 + 20 * seed as usize, 10);
            // Remove the heaviest (changes the weight scale) and the first.
            let heaviest = (0..weights.len()).max_by_key(|&i| weights[i]).unwrap_or(0);
            assert_small_disruption(&weights, heaviest, DEFAULT_MAGLEV_TABLE_SIZE);
            assert_small_disruption(&weights, 0, DEFAULT_MAGLEV_TABLE_SIZE);
        }
    }

    /// Pinned so an accidental change of hash, layout or turn order (which
    /// would reshuffle every deployed table) fails loudly.
    #[test]
    fn known_answers() {
        let table = MaglevTable::build(&candidates(&[1, 2, 3]), 5003);
        assert_eq!(table.digest(), "c2912980e214ba8df973d147fe6ea1b4");
        assert_eq!(&table.entries[..12], &[1, 1, 2, 2, 2, 2, 1, 2, 2, 1, 0, 2]);
        let client: SocketAddr = "192.0.2.7:40000".parse().unwrap_or_else(|_| unreachable!());
        assert_eq!(client_hash(client, true), 0xaa19_f258_69ad_5557);
        assert_eq!(client_hash(client, false), 0x3765_9cec_c6f3_1a23);
    }

    /// `siphasher`'s SipHasher24 is the reference SipHash-2-4: the first
    /// test vectors of the SipHash paper (key 00..0f, message 00..len-1).
    #[test]
    fn siphash_is_the_reference_siphash_2_4() {
        let k0 = u64::from_le_bytes([0, 1, 2, 3, 4, 5, 6, 7]);
        let k1 = u64::from_le_bytes([8, 9, 10, 11, 12, 13, 14, 15]);
        let message: Vec<u8> = (0..15).collect();
        assert_eq!(sip((k0, k1), &[]), 0x726f_db47_dd0e_0e31);
        assert_eq!(sip((k0, k1), &message), 0xa129_ca61_49be_45e5);
    }

    /// The client hash (`lb_common::sip`, shared with the XDP program) is the reference
    /// SipHash-2-4 with the client keys over the address octets and, with the port, the port
    /// in network byte order, for IPv4, IPv6 and IPv4-mapped clients.
    #[test]
    fn the_client_hash_is_siphash_of_the_address_and_port_bytes() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..2000 {
            let (a, b, port) = (next(), next(), next() as u16);
            let v4 = std::net::Ipv4Addr::from(a as u32);
            let v6 = std::net::Ipv6Addr::from(u128::from(a) << 64 | u128::from(b));
            for with_port in [false, true] {
                let bytes = |octets: &[u8]| {
                    let mut v = octets.to_vec();
                    if with_port {
                        v.extend(port.to_be_bytes());
                    }
                    sip(lb_common::sip::CLIENT_KEYS, &v)
                };
                let at = |ip: IpAddr| client_hash(SocketAddr::new(ip, port), with_port);
                assert_eq!(
                    at(v4.into()),
                    bytes(&v4.octets()),
                    "{v4}:{port} {with_port}"
                );
                assert_eq!(at(v4.to_ipv6_mapped().into()), bytes(&v4.octets()));
                assert_eq!(
                    at(v6.into()),
                    bytes(&v6.octets()),
                    "[{v6}]:{port} {with_port}"
                );
            }
        }
    }

    #[test]
    fn ipv4_mapped_clients_hash_like_ipv4() {
        let v4: SocketAddr = "192.0.2.7:40000".parse().unwrap_or_else(|_| unreachable!());
        let mapped: SocketAddr = "[::ffff:192.0.2.7]:40000"
            .parse()
            .unwrap_or_else(|_| unreachable!());
        assert_eq!(client_hash(v4, true), client_hash(mapped, true));
        assert_eq!(client_hash(v4, false), client_hash(mapped, false));
        assert_ne!(client_hash(v4, true), client_hash(v4, false));
    }

    /// With tiny weights a usable backend may own no slot; the fallback
    /// still finds it.
    #[test]
    fn fallback_reaches_backends_without_slots() {
        let cands = candidates(&[u32::MAX, 1]);
        let table = MaglevTable::build(&cands, 5);
        assert!(table.entries.iter().all(|&e| e == 0));
        let only_second = |i: usize| i == 1;
        assert_eq!(table.lookup(9, only_second), None);
        assert_eq!(table.fallback(9, only_second), Some(1));
    }

    proptest! {
        // No regression files: the tests must not write into the source tree.
        #![proptest_config(ProptestConfig {
            cases: 64,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn quotas_hold_for_random_weights(weights in prop::collection::vec(1u32..=10, 1..=20)) {
            assert_quotas(&weights, 5003);
        }

        /// Same table (by key) and same digest whatever the input order.
        #[test]
        fn table_is_independent_of_input_order(
            (original, shuffled) in prop::collection::vec(0u32..=10, 1..=30)
                .prop_map(|weights| candidates(&weights))
                .prop_flat_map(|cands| (Just(cands.clone()), Just(cands).prop_shuffle()))
        ) {
            let a = MaglevTable::build(&original, 5003);
            let b = MaglevTable::build(&shuffled, 5003);
            prop_assert_eq!(owners_by_key(&a, &original), owners_by_key(&b, &shuffled));
            prop_assert_eq!(a.digest(), b.digest());
        }
    }

    proptest! {
        // Each case builds two 65537-slot tables; keep it quick in debug.
        //
        // The seed is fixed because Maglev's bound is statistical, not a
        // guarantee: two backends whose permutations are correlated (worst:
        // equal skips, which a set of 100 keys has with probability ~7%)
        // race for the same slots, and removing a third one can flip a run
        // of those races. Measured over 1000 random sets of N <= 100 keys
        // with M = 65537, 0.1-0.5% of removals moved more than 1% of
        // foreign slots (worst seen 2.9%). A random seed would make this
        // test flaky; a fixed one keeps it a deterministic regression check.
        #![proptest_config(ProptestConfig {
            cases: 12,
            failure_persistence: None,
            rng_seed: proptest::test_runner::RngSeed::Fixed(0x6c62_6d61_676c_6576),
            ..ProptestConfig::default()
        })]

        #[test]
        fn removing_one_backend_moves_little(
            (weights, removed) in prop::collection::vec(1u32..=10, 2..=100)
                .prop_flat_map(|w| { let n = w.len(); (Just(w), 0..n) })
        ) {
            assert_small_disruption(&weights, removed, DEFAULT_MAGLEV_TABLE_SIZE);
        }
    }
}
