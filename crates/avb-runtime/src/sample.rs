//! Temperature + nucleus (top-p) sampling. On GPU devices with the kernels the device draws (`on_device`, from
//! the host's uniform draws), and a step reads back one id a row. Elsewhere the host samples a step's logits, in
//! expected time linear in the vocabulary: the nucleus's edge and the drawn token are each found by selection
//! (splitting around medians and adding up one side) instead of sorting the whole vocabulary, which took about
//! 10 ms a row for Qwen2.5's 152k tokens. Rows are sampled on parallel threads natively.

use avb_core::rng::SplitMix64;
use burn::tensor::{Int, Tensor};
use std::cmp::Ordering;

/// A token's probability and id.
#[derive(Clone, Copy, Debug)]
struct Weighted {
    p: f64,
    id: u32,
}

/// The order transformers' TopPLogitsWarper sorts tokens in: by probability, ties by id (a stable sort).
fn ascending(a: &Weighted, b: &Weighted) -> Ordering {
    a.p.total_cmp(&b.p).then(a.id.cmp(&b.id))
}

fn descending(a: &Weighted, b: &Weighted) -> Ordering {
    ascending(b, a)
}

/// Ranges this small are sorted and walked instead of split again.
const SMALL: usize = 32;

/// Softmax(logits / temperature), in f64.
fn probabilities(logits: &[f32], temperature: f32) -> Vec<Weighted> {
    let t = f64::from(temperature);
    // Scaled once, then exponentiated in place.
    let mut probs: Vec<Weighted> = logits
        .iter()
        .enumerate()
        .map(|(id, &l)| Weighted {
            p: f64::from(l) / t,
            id: id as u32,
        })
        .collect();
    let max = probs.iter().map(|w| w.p).fold(f64::NEG_INFINITY, f64::max);
    probs.iter_mut().for_each(|w| w.p = (w.p - max).exp());
    let total: f64 = probs.iter().map(|w| w.p).sum();
    probs.iter_mut().for_each(|w| w.p /= total);
    probs
}

/// Rearranges `v` and returns the index of the first token, in `order`, at which the running sum of
/// probabilities (in that order, the token's own included) exceeds `target`: every token before that index comes
/// earlier in the order, every token after it later. When no running sum exceeds `target` (only by rounding,
/// sums taken in different orders), the last token of the range the search narrowed to.
fn first_exceeding(
    v: &mut [Weighted],
    target: f64,
    order: fn(&Weighted, &Weighted) -> Ordering,
) -> usize {
    // The answer lies in v[lo..hi]; `below` is the mass of the tokens before lo.
    let (mut lo, mut hi, mut below) = (0, v.len(), 0.0);
    while hi - lo > SMALL {
        let mid = lo + (hi - lo) / 2;
        v[lo..hi].select_nth_unstable_by(mid - lo, order);
        let left: f64 = v[lo..mid].iter().map(|w| w.p).sum();
        if below + left > target {
            hi = mid;
        } else if below + left + v[mid].p > target {
            return mid;
        } else {
            below += left + v[mid].p;
            lo = mid + 1;
        }
    }
    v[lo..hi].sort_unstable_by(order);
    for (i, w) in v[lo..hi].iter().enumerate() {
        below += w.p;
        if below > target {
            return lo + i;
        }
    }
    hi.max(1) - 1
}

/// The nucleus of softmax(logits / temperature) as transformers' TopPLogitsWarper keeps it: in ascending order,
/// tokens whose running probability (from the least likely end) is at most 1 - top_p are dropped; the most
/// likely token always stays. In no particular order.
fn nucleus(logits: &[f32], temperature: f32, top_p: f32) -> Vec<Weighted> {
    let mut probs = probabilities(logits, temperature);
    if probs.is_empty() {
        return probs;
    }
    let edge = first_exceeding(&mut probs, 1.0 - f64::from(top_p), ascending);
    probs.split_off(edge)
}

/// One token drawn from the nucleus of softmax(logits / temperature): a uniform draw over the nucleus's mass,
/// walked from the most likely token down. Matches walking a whole sorted vocabulary up to the rounding of
/// sums taken in another order.
pub fn sample_top_p(logits: &[f32], temperature: f32, top_p: f32, rng: &mut SplitMix64) -> u32 {
    sample_top_p_at(logits, temperature, top_p, rng.unit_f64())
}

/// `sample_top_p` with the generator's draw given: `unit` in [0, 1).
pub fn sample_top_p_at(logits: &[f32], temperature: f32, top_p: f32, unit: f64) -> u32 {
    draw(nucleus(logits, temperature, top_p), unit)
}

/// The token at `unit` (in [0, 1)) of the kept tokens' mass, counted from the most likely token down.
fn draw(mut kept: Vec<Weighted>, unit: f64) -> u32 {
    let mass: f64 = kept.iter().map(|w| w.p).sum();
    match kept.is_empty() {
        true => 0,
        false => {
            let at = first_exceeding(&mut kept, unit * mass, descending);
            kept[at].id
        }
    }
}

/// One token per row of logits [rows, vocab] drawn on the device from the nucleus of softmax(logits /
/// temperature) at the row's `units` [rows] (the host's uniform draws), as `sample_top_p_at` draws it but for the
/// rounding of f32 sums: [rows, 1], one id a row to read back. `None` off a CubeCL device (or with the GPU features
/// off) or for shapes the kernel does not take, where the logits go to `sample_top_p`.
pub fn on_device(
    logits: &Tensor<2>,
    units: &Tensor<1>,
    temperature: f32,
    top_p: f32,
) -> Option<Tensor<2, Int>> {
    crate::kernels::sample_top_p(logits, units, temperature, top_p)
}

/// `sample_top_p` for each row of `logits` (rows of `vocab` values) that has a generator; 0 for rows without
/// one (finished rows). Rows run on parallel threads where there are several (not in WebAssembly).
pub fn sample_rows(
    logits: &[f32],
    vocab: usize,
    rngs: Vec<Option<&mut SplitMix64>>,
    temperature: f32,
    top_p: f32,
) -> Vec<u32> {
    let sample = |(row, rng): (&[f32], Option<&mut SplitMix64>)| {
        rng.map_or(0, |rng| sample_top_p(row, temperature, top_p, rng))
    };
    let jobs: Vec<_> = logits.chunks(vocab.max(1)).zip(rngs).collect();
    let threads = if cfg!(target_arch = "wasm32") {
        1
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    };
    if jobs.len() < 2 || threads < 2 {
        return jobs.into_iter().map(sample).collect();
    }
    let per_thread = jobs.len().div_ceil(threads);
    let mut jobs = jobs.into_iter();
    std::thread::scope(|s| {
        let handles: Vec<_> = std::iter::from_fn(|| {
            let part: Vec<_> = jobs.by_ref().take(per_thread).collect();
            (!part.is_empty())
                .then(|| s.spawn(move || part.into_iter().map(sample).collect::<Vec<u32>>()))
        })
        .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nucleus and draw by sorting the whole vocabulary, transformers' way: the reference the selection must
    /// match.
    fn sorted_reference(
        logits: &[f32],
        temperature: f32,
        top_p: f32,
        unit: f64,
    ) -> (Vec<u32>, u32) {
        let mut probs = probabilities(logits, temperature);
        probs.sort_by(ascending);
        let cut = 1.0 - f64::from(top_p);
        let n = probs.len();
        let mut cumulative = 0.0;
        let kept: Vec<Weighted> = probs
            .into_iter()
            .enumerate()
            .filter_map(|(rank, w)| {
                cumulative += w.p;
                (cumulative > cut || rank + 1 == n).then_some(w)
            })
            .collect();
        let mass: f64 = kept.iter().map(|w| w.p).sum();
        let mut u = unit * mass;
        let mut drawn = kept[kept.len() - 1].id;
        for w in kept.iter().rev() {
            if u < w.p {
                drawn = w.id;
                break;
            }
            u -= w.p;
        }
        let mut ids: Vec<u32> = kept.iter().map(|w| w.id).collect();
        ids.sort_unstable();
        (ids, drawn)
    }

    fn ids(mut kept: Vec<Weighted>) -> Vec<u32> {
        kept.sort_by_key(|w| w.id);
        kept.into_iter().map(|w| w.id).collect()
    }

    /// Logits of `n` tokens: normal draws times `spread` (small: flat, large: peaked), some repeated exactly so
    /// that ties meet the nucleus's edge.
    fn logits(rng: &mut SplitMix64, n: usize, spread: f64, ties: bool) -> Vec<f32> {
        let mut v: Vec<f32> = (0..n).map(|_| (rng.normal() * spread) as f32).collect();
        if ties {
            for i in 0..n / 4 {
                v[4 * i + 1] = v[4 * i];
            }
        }
        v
    }

    #[test]
    fn selection_matches_sorting_the_vocabulary() {
        let mut rng = SplitMix64::new(11);
        let mut draws = 0;
        for case in 0..240 {
            let n = [1, 2, 7, 33, 500, 4099][case % 6];
            let spread = [0.1, 1.0, 4.0, 12.0][case / 6 % 4];
            let (temperature, top_p) =
                [(1.0, 1.0), (0.7, 0.9), (1.3, 0.5), (0.5, 0.01)][case / 24 % 4];
            let logits = logits(&mut rng, n, spread, case % 2 == 0);
            let kept = nucleus(&logits, temperature, top_p);
            let (reference_ids, _) = sorted_reference(&logits, temperature, top_p, 0.0);
            assert_eq!(
                ids(kept),
                reference_ids,
                "case {case}: n {n}, spread {spread}"
            );
            for _ in 0..20 {
                let unit = rng.unit_f64();
                let (_, expected) = sorted_reference(&logits, temperature, top_p, unit);
                assert_eq!(
                    draw(nucleus(&logits, temperature, top_p), unit),
                    expected,
                    "case {case}: draw {unit}"
                );
                draws += 1;
            }
        }
        assert_eq!(draws, 240 * 20);
    }

    /// transformers' TemperatureLogitsWarper + TopPLogitsWarper (float64) on seeded logits, from
    /// tests/scripts/make_top_p_golden.py: the same tokens kept.
    #[test]
    fn nucleus_matches_transformers_top_p_warper() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/golden/top_p.json"
        );
        let text = std::fs::read_to_string(path).expect("tests/fixtures/golden/top_p.json");
        let cases: Vec<serde_json::Value> = serde_json::from_str(&text).expect("top_p.json parses");
        assert!(cases.len() >= 8);
        for case in &cases {
            let logits: Vec<f32> = serde_json::from_value::<Vec<f64>>(case["logits"].clone())
                .expect("logits")
                .into_iter()
                .map(|l| l as f32)
                .collect();
            let temperature = case["temperature"].as_f64().expect("temperature") as f32;
            let top_p = case["top_p"].as_f64().expect("top_p") as f32;
            let expected: Vec<u32> = serde_json::from_value(case["kept"].clone()).expect("kept");
            assert!(!expected.is_empty());
            assert_eq!(
                ids(nucleus(&logits, temperature, top_p)),
                expected,
                "{} tokens, temperature {temperature}, top_p {top_p}",
                logits.len()
            );
        }
    }

    #[test]
    fn rows_sample_in_parallel_as_one_by_one() {
        let mut rng = SplitMix64::new(5);
        let (rows, vocab) = (9, 3000);
        let all: Vec<f32> = (0..rows)
            .flat_map(|_| logits(&mut rng, vocab, 3.0, false))
            .collect();
        let mut parallel: Vec<SplitMix64> = (0..rows).map(|r| SplitMix64::new(r as u64)).collect();
        let mut serial: Vec<SplitMix64> = (0..rows).map(|r| SplitMix64::new(r as u64)).collect();
        // Row 4 has finished: no generator, token 0, and no draw taken from anyone's generator.
        let gens = parallel
            .iter_mut()
            .enumerate()
            .map(|(r, g)| (r != 4).then_some(g))
            .collect();
        let got = sample_rows(&all, vocab, gens, 0.8, 0.95);
        let expected: Vec<u32> = all
            .chunks(vocab)
            .zip(serial.iter_mut())
            .enumerate()
            .map(|(r, (row, g))| {
                if r == 4 {
                    0
                } else {
                    sample_top_p(row, 0.8, 0.95, g)
                }
            })
            .collect();
        assert_eq!(got, expected);
        assert_eq!(parallel[4].next_u64(), SplitMix64::new(4).next_u64());
    }
}
