//! Lookup structures rebuilt when the endpoints change, so that a pick is O(1): weighted
//! sampling (Vose's alias method), a weighted round-robin schedule, a Maglev table.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Draws endpoint positions in proportion to their weights.
#[derive(Debug, Clone, Default)]
pub(crate) struct WeightedSampler {
    n: u32,
    /// Empty when every weight is equal: a draw is then a uniform position.
    prob: Vec<u32>,
    alias: Vec<u32>,
}

impl WeightedSampler {
    pub(crate) fn new(weights: &[u32]) -> Self {
        let n = weights.len();
        let uniform = weights.windows(2).all(|w| w[0] == w[1]);
        if uniform || n == 0 {
            return Self {
                n: n as u32,
                prob: Vec::new(),
                alias: Vec::new(),
            };
        }
        // Vose: scale weights so their mean is 1, pair each small one with a large one.
        let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
        let mut scaled: Vec<f64> = weights
            .iter()
            .map(|&w| f64::from(w) * n as f64 / total)
            .collect();
        let mut prob = vec![u32::MAX; n];
        let mut alias: Vec<u32> = (0..n as u32).collect();
        let (mut small, mut large): (Vec<usize>, Vec<usize>) =
            (0..n).partition(|&i| scaled[i] < 1.0);
        while let (Some(s), Some(&l)) = (small.pop(), large.last()) {
            prob[s] = (scaled[s] * f64::from(u32::MAX)) as u32;
            alias[s] = l as u32;
            scaled[l] -= 1.0 - scaled[s];
            if scaled[l] < 1.0 {
                large.pop();
                small.push(l);
            }
        }
        Self {
            n: n as u32,
            prob,
            alias,
        }
    }

    /// A position drawn with `r`, 64 random bits.
    #[inline]
    pub(crate) fn sample(&self, r: u64) -> usize {
        let i = reduce(r as u32, self.n);
        if self.prob.is_empty() {
            return i;
        }
        if ((r >> 32) as u32) <= self.prob[i] {
            i
        } else {
            self.alias[i] as usize
        }
    }
}

/// Maps 32 random bits onto `0..n` without a division (Lemire).
#[inline]
pub(crate) fn reduce(r: u32, n: u32) -> usize {
    ((u64::from(r) * u64::from(n)) >> 32) as usize
}

/// A weighted round-robin schedule: each position appears as often as its weight, spread
/// out (earliest-deadline-first order, as smooth weighted round robin).
#[derive(Debug, Clone, Default)]
pub(crate) struct Schedule {
    pub(crate) order: Vec<u32>,
}

/// The longest schedule kept; larger weight sums are scaled down.
const MAX_SCHEDULE: u64 = 1 << 16;

impl Schedule {
    pub(crate) fn new(weights: &[u32]) -> Self {
        let n = weights.len();
        if weights.windows(2).all(|w| w[0] == w[1]) {
            return Self {
                order: (0..n as u32).collect(),
            };
        }
        let g = weights.iter().copied().fold(0, gcd);
        let mut w: Vec<u64> = weights.iter().map(|&x| u64::from(x / g.max(1))).collect();
        let total: u64 = w.iter().sum();
        if total > MAX_SCHEDULE {
            for x in &mut w {
                *x = (*x * MAX_SCHEDULE / total).max(1);
            }
        }
        let len: u64 = w.iter().sum();
        if len.saturating_mul(n as u64) <= SMOOTH_WORK {
            return Self {
                order: smooth(&w, len),
            };
        }
        // Large sets: each position's k-th turn is due at k / weight, served in due order
        // (O(len log n); spread out, slightly less evenly than the smooth order).
        let mut heap: BinaryHeap<Reverse<Due>> = w
            .iter()
            .enumerate()
            .map(|(i, &wi)| {
                Reverse(Due {
                    turn: 1,
                    weight: wi,
                    pos: i as u32,
                })
            })
            .collect();
        let mut order = Vec::with_capacity(len as usize);
        while (order.len() as u64) < len {
            let Some(Reverse(mut due)) = heap.pop() else {
                break;
            };
            order.push(due.pos);
            due.turn += 1;
            if due.turn <= due.weight {
                heap.push(Reverse(due));
            }
        }
        Self { order }
    }
}

/// Work bound (schedule length × endpoints) for the smooth order.
const SMOOTH_WORK: u64 = 1 << 22;

/// nginx's smooth weighted round robin: every step each position gains its weight, the
/// richest is served and pays the total. Turns of a heavy position are spread evenly.
fn smooth(w: &[u64], len: u64) -> Vec<u32> {
    let total = len as i64;
    let mut current = vec![0i64; w.len()];
    let mut order = Vec::with_capacity(len as usize);
    for _ in 0..len {
        let mut best = 0;
        for i in 0..w.len() {
            current[i] += w[i] as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        order.push(best as u32);
    }
    order
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Due {
    turn: u64,
    weight: u64,
    pos: u32,
}

impl Ord for Due {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // turn/weight, compared without division; ties go to the lower position.
        (u128::from(self.turn) * u128::from(other.weight))
            .cmp(&(u128::from(other.turn) * u128::from(self.weight)))
            .then(self.pos.cmp(&other.pos))
    }
}

impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// A Maglev lookup table (Eisenbud et al., NSDI 2016): every entry names an endpoint,
/// each endpoint owns a share of entries in proportion to its weight, and when one of N
/// endpoints leaves, close to 1/N of the entries change owner.
///
/// Each endpoint fills the entries of its own permutation, an offset and a stride (skip)
/// taken from its hash. Two endpoints whose hashes give the same stride (among M - 1
/// strides, M the table size: for N endpoints a chance of about N²/2M, 0.14% for 14
/// endpoints and M = 65 537) walk the table in lockstep, a fixed distance apart, and a
/// change elsewhere that delays one of them by a turn passes entries between the two all
/// along their walk: that change then moves up to about twice the 1/N share. As in other
/// Maglev implementations (Envoy's), the stride is not made unique: the table must stay a
/// function of the endpoint set alone, so that replicas and other instances with the
/// same endpoints agree on every key, and any rule that parts two strides changes one of
/// them when the other endpoint leaves. For the same reason the endpoints fill the table
/// in the order of their hashes, whatever order they came in.
#[derive(Debug, Clone, Default)]
pub(crate) struct Maglev {
    pub(crate) table: Vec<u32>,
    /// The endpoints' hashes, sorted, with their positions: a ring for the keys whose
    /// choices in the table are all out of rotation (see [`ring`](Self::ring)).
    ring: Vec<(u64, u32)>,
}

/// Table sizes: primes. The first, Envoy's default, serves every fleet of up to 65 537
/// endpoints: a size that followed the endpoint count (100 entries each, as this table
/// once had) changed when a fleet crossed 655, 1 310, 2 621... endpoints, and a table of
/// another size maps nearly every key elsewhere: one instance flapping at that size moved
/// every key each time. Above 655 endpoints each holds fewer than 100 entries: weights are
/// honoured a little less finely, and more pairs of endpoints walk in lockstep (below).
const PRIMES: [u64; 7] = [
    65_537, 131_071, 262_139, 524_287, 1_048_573, 2_097_143, 4_194_301,
];

impl Maglev {
    /// Builds the table for endpoints identified by stable `hashes`, with `weights`; an
    /// entry holds a position in `hashes`. The same endpoints in another order get the
    /// same table, up to that renumbering.
    pub(crate) fn new(hashes: &[u64], weights: &[u32]) -> Self {
        Self::build(hashes, weights).0
    }

    /// [`new`](Self::new)'s table, and the turns it took (each a heap step and a walk to
    /// a free entry): `M` of them, whatever the weights.
    fn build(hashes: &[u64], weights: &[u32]) -> (Self, u64) {
        let n = hashes.len();
        if n == 0 {
            return (Self::default(), 0);
        }
        let m = PRIMES
            .iter()
            .copied()
            .find(|&p| p >= n as u64)
            .unwrap_or(PRIMES[PRIMES.len() - 1]);
        let offsets: Vec<u64> = hashes.iter().map(|&h| mix(h) % m).collect();
        let skips: Vec<u64> = hashes.iter().map(|&h| stride(h, m)).collect();
        let weight: Vec<u64> = weights.iter().map(|&w| u64::from(w.max(1))).collect();
        let max_w = weight.iter().copied().max().unwrap_or(1);
        // Endpoints take turns in the order of their hashes, not of their positions: the
        // positions follow the order discovery inserted them (and a removal moves the last
        // one into the gap), so a table filled in position order would differ between
        // replicas, and after an endpoint leaves and comes back, for the same set.
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_unstable_by_key(|&i| (hashes[i], weights[i]));
        // Rounds: in each, every endpoint in that order earns its weight over the largest
        // one, and takes a turn per whole credit. Endpoint i's k-th turn is in round
        // ceil(k · max / w_i), exactly; a heap hands out the turns in round order, and
        // within a round in the endpoints' order. (Walking every endpoint every round took
        // N·M steps when one weight dwarfs the others, each round then filling one entry:
        // 2.6·10⁹ for 5 000 endpoints, in `poll_ready`, at every change of the set.)
        // k ≤ M < 2²³ and max < 2³², so k · max fits in a u64.
        let round = |i: usize, k: u64| (k * max_w).div_ceil(weight[i]);
        let mut turns = vec![0u64; n];
        let mut heap: std::collections::BinaryHeap<std::cmp::Reverse<(u64, usize)>> = order
            .iter()
            .enumerate()
            .map(|(rank, &i)| std::cmp::Reverse((round(i, 1), rank)))
            .collect();
        let mut next = vec![0u64; n];
        let mut table = vec![u32::MAX; m as usize];
        let mut filled = 0u64;
        let mut steps = 0u64;
        while filled < m {
            let Some(std::cmp::Reverse((_, rank))) = heap.pop() else {
                break;
            };
            steps += 1;
            let i = order[rank];
            // The next entry of i's permutation that nobody owns yet.
            loop {
                let c = ((offsets[i] + next[i] * skips[i]) % m) as usize;
                next[i] += 1;
                if table[c] == u32::MAX {
                    table[c] = i as u32;
                    filled += 1;
                    break;
                }
            }
            turns[i] += 1;
            heap.push(std::cmp::Reverse((round(i, turns[i] + 1), rank)));
        }
        let ring = order.iter().map(|&i| (hashes[i], i as u32)).collect();
        (Self { table, ring }, steps)
    }

    /// Every endpoint once, in an order fixed by `hash` and the endpoints alone: around
    /// the ring of the endpoints' hashes from the key's point. Where a key goes when its
    /// choices in the table are out of rotation; O(log N) to start, O(1) a step.
    pub(crate) fn ring(&self, hash: u64) -> impl Iterator<Item = usize> + '_ {
        let n = self.ring.len();
        let point = mix(hash ^ crate::util::GOLDEN);
        let start = self.ring.partition_point(|&(h, _)| h < point);
        (0..n).map(move |j| self.ring[(start + j) % n].1 as usize)
    }

    /// The endpoint owning `hash`, and the ones after it to try in order.
    #[inline]
    pub(crate) fn lookup(&self, hash: u64, attempt: u64) -> usize {
        let m = self.table.len() as u64;
        let h = if attempt == 0 {
            hash
        } else {
            mix(hash.wrapping_add(attempt.wrapping_mul(crate::util::GOLDEN)))
        };
        self.table[(h % m) as usize] as usize
    }
}

/// The stride of the endpoint of `hash` through a Maglev table of `m` entries (a prime):
/// one of `1..m`, so that its walk visits every entry.
fn stride(hash: u64, m: u64) -> u64 {
    mix(hash ^ crate::util::GOLDEN) % (m - 1) + 1
}

pub(crate) use crate::util::mix;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alias_sampling_follows_weights() {
        let s = WeightedSampler::new(&[1, 3, 6]);
        let mut counts = [0u32; 3];
        let mut r = 1u64;
        for _ in 0..100_000 {
            r = mix(r);
            counts[s.sample(r)] += 1;
        }
        let share = |i: usize| f64::from(counts[i]) / 100_000.0;
        assert!((share(0) - 0.1).abs() < 0.01, "{counts:?}");
        assert!((share(1) - 0.3).abs() < 0.01, "{counts:?}");
        assert!((share(2) - 0.6).abs() < 0.01, "{counts:?}");
    }

    #[test]
    fn schedule_interleaves_by_weight() {
        let s = Schedule::new(&[1, 2, 1]);
        assert_eq!(s.order.len(), 4);
        assert_eq!(s.order.iter().filter(|&&p| p == 1).count(), 2);
        // The weight-2 endpoint's turns are not back to back.
        let at: Vec<usize> = (0..4).filter(|&i| s.order[i] == 1).collect();
        assert!(at[1] - at[0] >= 2, "{:?}", s.order);
        assert_eq!(Schedule::new(&[5, 5]).order, vec![0, 1]);
        let big = Schedule::new(&[u32::MAX, 1, 7]);
        assert!(big.order.len() as u64 <= MAX_SCHEDULE + 3);
        assert!(big.order.contains(&1));
    }

    /// The entries whose owner changes when `hashes[leaving]` leaves (the set keeps its
    /// order as `EndpointSet` does, the last endpoint taking the leaver's place), as a
    /// share of the table.
    fn moved_share(hashes: &[u64], leaving: usize) -> f64 {
        let before = Maglev::new(hashes, &vec![1; hashes.len()]);
        let mut rest = hashes.to_vec();
        rest.swap_remove(leaving);
        let after = Maglev::new(&rest, &vec![1; rest.len()]);
        let moved = before
            .table
            .iter()
            .zip(&after.table)
            .filter(|&(&b, &a)| hashes[b as usize] != rest[a as usize])
            .count();
        moved as f64 / before.table.len() as f64
    }

    /// The size of the table `hashes` get, as `Maglev::new` chooses it.
    fn table_size(hashes: &[u64]) -> u64 {
        Maglev::new(hashes, &vec![1; hashes.len()]).table.len() as u64
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]

        /// With every stride its own, one of N endpoints leaving moves close to 1/N of the
        /// entries: the leaver's, and few others.
        #[test]
        fn a_leaving_endpoint_moves_about_its_own_share(
            n in 2usize..40,
            leaving in 0usize..40,
            seed in proptest::prelude::any::<u64>(),
        ) {
            let hashes: Vec<u64> = (0..n as u64).map(|i| mix(seed ^ mix(i))).collect();
            let m = table_size(&hashes);
            let mut strides: Vec<u64> = hashes.iter().map(|&h| stride(h, m)).collect();
            strides.sort_unstable();
            strides.dedup();
            proptest::prop_assume!(strides.len() == n);
            let ideal = 1.0 / n as f64;
            let share = moved_share(&hashes, leaving % n);
            proptest::prop_assert!(share < ideal * 1.3 + 0.01, "{n} endpoints: {share:.4} moved, ideal {ideal:.4}");
        }
    }

    /// Two endpoints with the same stride (found by `tests/balance`'s property through the
    /// whole balancer): one leaving elsewhere moves twice the minimal share, not more.
    #[test]
    fn endpoints_sharing_a_stride_move_at_most_about_twice_the_minimal_share() {
        let salt = 14_145_809_798_877_825_762u64;
        let hashes: Vec<u64> = (0..14)
            .map(|i| crate::balance::hash_key(format!("node-{salt}/s-{i}").as_str()))
            .collect();
        let m = table_size(&hashes);
        assert_eq!(stride(hashes[4], m), stride(hashes[13], m));
        let ideal = 1.0 / 14.0;
        let share = moved_share(&hashes, 0);
        assert!(
            share < ideal * 2.5 + 0.01,
            "{share:.4} moved, ideal {ideal:.4}"
        );
        // Without one of the pair, the same change moves about its own share (of 13).
        let ideal = 1.0 / 13.0;
        let share = moved_share(&hashes[..13], 0);
        assert!(
            share < ideal * 1.3 + 0.01,
            "{share:.4} moved without the pair, ideal {ideal:.4}"
        );
    }

    /// The table depends on the endpoints, not on the order they are given in.
    #[test]
    fn maglev_ignores_the_order_of_the_endpoints() {
        let hashes: Vec<u64> = (0..50u64).map(mix).collect();
        let weights: Vec<u32> = (0..50u32).map(|i| 1 + i % 3).collect();
        let before = Maglev::new(&hashes, &weights);
        let mut order: Vec<usize> = (0..50).collect();
        order.reverse();
        order.swap(3, 17);
        let shuffled: Vec<u64> = order.iter().map(|&i| hashes[i]).collect();
        let reweighted: Vec<u32> = order.iter().map(|&i| weights[i]).collect();
        let after = Maglev::new(&shuffled, &reweighted);
        assert!(
            before
                .table
                .iter()
                .zip(&after.table)
                .all(|(&b, &a)| hashes[b as usize] == shuffled[a as usize])
        );
    }

    /// The ring visits every endpoint once, in an order that depends on the key and the
    /// endpoints, not on the order they are given in.
    #[test]
    fn the_ring_visits_every_endpoint_once_in_an_order_of_the_set() {
        let hashes: Vec<u64> = (0..20u64).map(mix).collect();
        let reversed: Vec<u64> = hashes.iter().rev().copied().collect();
        let (a, b) = (
            Maglev::new(&hashes, &[1; 20]),
            Maglev::new(&reversed, &[1; 20]),
        );
        for key in 0..100u64 {
            let mut seen: Vec<usize> = a.ring(key).collect();
            let there: Vec<u64> = seen.iter().map(|&i| hashes[i]).collect();
            let here: Vec<u64> = b.ring(key).map(|i| reversed[i]).collect();
            assert_eq!(there, here);
            seen.sort_unstable();
            assert_eq!(seen, (0..20).collect::<Vec<_>>());
        }
    }

    /// One weight far above the others (an instance reporting `u32::MAX`): the table
    /// takes `M` turns, not a walk over every endpoint for each entry (N·M: 5.2·10⁸ steps
    /// here, seconds of a runtime's thread at every change of the set). The heavy endpoint
    /// owns all but the light ones' first turns.
    #[test]
    fn a_dwarfing_weight_builds_the_table_in_m_turns() {
        let hashes: Vec<u64> = (0..2_000u64).map(mix).collect();
        let mut weights = vec![1u32; 2_000];
        weights[0] = u32::MAX;
        let (t, steps) = Maglev::build(&hashes, &weights);
        let m = t.table.len() as u64;
        assert_eq!(m, 65_537, "one size up to 65 537 endpoints");
        assert_eq!(steps, m);
        let heavy = t.table.iter().filter(|&&x| x == 0).count() as u64;
        assert!(heavy >= m - 2_000, "{heavy} of {m}");
    }

    #[test]
    fn maglev_shares_follow_weights() {
        let hashes: Vec<u64> = (0..10u64).map(mix).collect();
        let mut weights = vec![1u32; 10];
        weights[0] = 3;
        let t = Maglev::new(&hashes, &weights);
        let count = |i: u32| t.table.iter().filter(|&&x| x == i).count() as f64;
        let unit = t.table.len() as f64 / 12.0;
        assert!((count(0) / unit - 3.0).abs() < 0.1);
        assert!((count(1) / unit - 1.0).abs() < 0.1);
    }
}
