//! Parity with Hugging Face transformers on tiny random-weight models of each family (float32, eager attention),
//! from tests/fixtures/tiny made by tests/scripts/make_tiny_models.py: logits of a left-padded batch, the residual
//! stream at block K, logits with injected embedding rows, and batched greedy continuations.

mod common;

use avb_runtime::model::to_vec;
use avb_runtime::{
    generate, Control, Decoder, Finish, GenerateOptions, Injection, Input, Model, Sampling,
};
use common::{row_errors, Golden};
use std::path::PathBuf;

const TOLERANCE: f64 = 1e-4;

fn dir(family: &str) -> PathBuf {
    common::repo_root().join("tests/fixtures/tiny").join(family)
}

fn worst_row_error(a: &[f32], b: &[f32], width: usize) -> f64 {
    row_errors(a, b, width).into_iter().fold(0.0, f64::max)
}

/// Rows of the golden batch with their padding removed.
fn inputs(g: &Golden) -> (Vec<Input>, Vec<usize>) {
    let (ids, shape) = g.i64s("input_ids");
    let (mask, _) = g.i64s("attention_mask");
    let t = shape[1];
    let mut out = Vec::new();
    let mut pads = Vec::new();
    for r in 0..shape[0] {
        let row = &ids[r * t..(r + 1) * t];
        let m = &mask[r * t..(r + 1) * t];
        let pad = m.iter().take_while(|v| **v == 0).count();
        pads.push(pad);
        out.push(Input::ids(row[pad..].iter().map(|v| *v as u32).collect()));
    }
    (out, pads)
}

/// Compare [B, T, W] outputs of ours and golden at the real (unpadded) positions of each row.
fn compare_real_positions(ours: &[f32], golden: &[f32], shape: &[usize], pads: &[usize]) -> f64 {
    let (t, w) = (shape[1], shape[2]);
    let mut worst: f64 = 0.0;
    for (r, pad) in pads.iter().enumerate() {
        let range = (r * t + pad) * w..(r + 1) * t * w;
        worst = worst.max(worst_row_error(&ours[range.clone()], &golden[range], w));
    }
    worst
}

fn check_family(family: &str) {
    let device = common::test_device();
    let d = dir(family);
    let model = Model::load(&d, &device).unwrap();
    let g = Golden::open(&d.join("golden.safetensors"));
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("golden.json")).unwrap()).unwrap();
    let (batch, pads) = inputs(&g);

    let (want, shape) = g.f32s("logits");
    let got = to_vec(model.logits(&batch).unwrap()).unwrap();
    let err = compare_real_positions(&got, &want, &shape, &pads);
    println!("{family}: logits worst relative error {err:.2e}");
    assert!(err < TOLERANCE, "{family} logits: {err:e}");

    let k = meta["layer_k"].as_u64().unwrap() as usize;
    let (want, shape) = g.f32s("hidden_K");
    let got = to_vec(model.forward_to(&batch, k, None).unwrap()).unwrap();
    let err = compare_real_positions(&got, &want, &shape, &pads);
    println!("{family}: hidden state at block {k} worst relative error {err:.2e}");
    assert!(err < TOLERANCE, "{family} hidden_K: {err:e}");

    let positions: Vec<usize> = meta["inject_positions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let (vectors, vshape) = g.f32s("inject_vectors");
    let mut injected = batch[0].clone();
    injected.injections = positions
        .iter()
        .enumerate()
        .map(|(i, &position)| Injection {
            layer: 0,
            position,
            vector: vectors[i * vshape[1]..(i + 1) * vshape[1]].to_vec(),
        })
        .collect();
    let (want, shape) = g.f32s("inject_logits");
    let got = to_vec(model.logits(&[injected]).unwrap()).unwrap();
    let err = compare_real_positions(&got, &want, &shape, &[0]);
    println!("{family}: logits with injected rows worst relative error {err:.2e}");
    assert!(err < TOLERANCE, "{family} inject_logits: {err:e}");

    let n_prompts = meta["prompts"].as_u64().unwrap() as usize;
    let n_new = meta["n_new"].as_u64().unwrap() as usize;
    let prompts: Vec<Input> = (0..n_prompts)
        .map(|i| {
            Input::ids(
                g.i64s(&format!("prompt_{i}"))
                    .0
                    .iter()
                    .map(|v| *v as u32)
                    .collect(),
            )
        })
        .collect();
    let opts = GenerateOptions {
        max_new_tokens: n_new,
        sampling: Sampling::Greedy,
        stop_ids: Vec::new(),
        row_seeds: None,
        max_batch: None,
    };
    let mut streamed = vec![Vec::new(); n_prompts];
    let outs = generate(&model, &prompts, &opts, &mut |row, id| {
        streamed[row].push(id);
        Control::Continue
    })
    .unwrap();
    for (i, out) in outs.iter().enumerate() {
        let want: Vec<u32> = g
            .i64s(&format!("greedy_{i}"))
            .0
            .iter()
            .map(|v| *v as u32)
            .collect();
        assert_eq!(
            out.ids, want,
            "{family} greedy continuation of prompt {i} (batched)"
        );
        assert_eq!(streamed[i], want, "{family} streamed tokens of prompt {i}");
    }
    println!("{family}: {n_prompts} batched greedy continuations of {n_new} tokens identical");

    // On a GPU device the decoder records a step once and replays it; the same tokens come out with recording
    // off, and on the CPU no step is recorded.
    let on_gpu = std::env::var("AVB_TEST_DEVICE").is_ok_and(|d| d != "cpu");
    let before = model.decode_steps();
    let mut decoder = Decoder::new(&model, &prompts, &opts).unwrap();
    let mut steps = 0;
    while let Some(readback) = decoder.readback() {
        decoder
            .advance(readback.read().unwrap(), &mut |_, _| Control::Continue)
            .unwrap();
        steps += 1;
        if steps == 2 {
            assert_eq!(
                model.decode_steps().since(before).replayed > 0,
                on_gpu,
                "{family}: a decoding step is replayed exactly on GPU devices"
            );
        }
    }
    let replayed = decoder.finish();
    // The model's step counts: every step after the prefill's token, all but the recorded first replayed on GPUs
    // (the tokens above say that steps queued ahead chain the right ids).
    let counted = model.decode_steps().since(before);
    assert_eq!(
        counted.launched + counted.replayed,
        steps - 1,
        "{family}: steps counted"
    );
    let expected_replays = if on_gpu { steps - 2 } else { 0 };
    assert_eq!(
        counted.replayed, expected_replays,
        "{family}: replayed steps"
    );
    // Greedy rows with no input waiting: every replayed step is queued before the previous one's ids are read,
    // and none past the budget.
    assert_eq!(
        counted.ahead, expected_replays,
        "{family}: steps queued ahead"
    );
    let mut unrecorded = Model::load(&d, &device).unwrap();
    unrecorded.set_graphs(false);
    let plain = generate(&unrecorded, &prompts, &opts, &mut |_, _| Control::Continue).unwrap();
    assert_eq!(
        unrecorded.decode_steps().replayed,
        0,
        "{family}: nothing replayed with recording off"
    );
    for (i, (a, b)) in replayed.iter().zip(&plain).enumerate() {
        assert_eq!(
            a.ids, b.ids,
            "{family}: prompt {i} with and without recorded steps"
        );
        assert_eq!(a.ids, g.ids(&format!("greedy_{i}")), "{family}: prompt {i}");
    }

    // Continuous batching: 24 sequences (each prompt 8 times) through 3 rows, each stopped by the callback after
    // its own number of tokens, so rows finish at different steps and are refilled mid-run; 70-odd steps in a
    // cache of 64 positions force its entries to shift left as well. Every sequence must still be
    // transformers' continuation.
    // With 8 rows, rows are refilled two at a time (a quarter of the batch).
    let many: Vec<Input> = (0..24).map(|j| prompts[j % n_prompts].clone()).collect();
    let stop_after = |j: usize| (6 + j % 7).min(n_new);
    for rows in [3, 8] {
        let refill = GenerateOptions {
            max_batch: Some(rows),
            ..opts.clone()
        };
        let mut counts = vec![0; many.len()];
        let outs = generate(&model, &many, &refill, &mut |i, _| {
            counts[i] += 1;
            if counts[i] == stop_after(i) {
                Control::Stop
            } else {
                Control::Continue
            }
        })
        .unwrap();
        for (j, out) in outs.iter().enumerate() {
            let want = g.ids(&format!("greedy_{}", j % n_prompts));
            assert_eq!(
                out.ids,
                want[..stop_after(j)],
                "{family}: sequence {j} decoded with refills into {rows} rows"
            );
            assert_eq!(out.finish, Finish::Callback, "{family}: sequence {j}");
        }
        println!("{family}: 24 sequences through {rows} refilled rows identical");
    }

    // One row: the shortest prompt stops after one token and the longest (17 > 4 + 1 positions) takes its row,
    // so the cache's entries first move right to make room for the longer prompt.
    let by_length = |longest: bool| {
        let lens = prompts.iter().map(|p| p.ids.len()).enumerate();
        if longest {
            lens.max_by_key(|(_, n)| *n).unwrap().0
        } else {
            lens.min_by_key(|(_, n)| *n).unwrap().0
        }
    };
    let (short, long) = (by_length(false), by_length(true));
    let pair = [prompts[short].clone(), prompts[long].clone()];
    let one_row = GenerateOptions {
        max_batch: Some(1),
        ..opts.clone()
    };
    let outs = generate(&model, &pair, &one_row, &mut |i, _| {
        if i == 0 {
            Control::Stop
        } else {
            Control::Continue
        }
    })
    .unwrap();
    assert_eq!(outs[0].ids, g.ids(&format!("greedy_{short}"))[..1]);
    assert_eq!(
        outs[1].ids,
        g.ids(&format!("greedy_{long}")),
        "{family}: a longer prompt refilled into a shorter cache"
    );

    // Sampled decoding chooses on the device where it can (GPU devices): the same seeds give the tokens the
    // host's sampler draws from the same model's logits with the kernels off, through refilled rows too; steps
    // are replayed and queued ahead as greedy ones are.
    let sampled = GenerateOptions {
        sampling: Sampling::TopP {
            temperature: 0.8,
            top_p: 0.9,
            seed: 7,
        },
        ..opts.clone()
    };
    let mut on_host = Model::load(&d, &device).unwrap();
    on_host.set_kernels(false);
    let before = model.decode_steps();
    let ours = generate(&model, &prompts, &sampled, &mut |_, _| Control::Continue).unwrap();
    let counted = model.decode_steps().since(before);
    assert_eq!(
        counted.replayed > 0 && counted.ahead > 0,
        on_gpu,
        "{family}: sampled steps replayed and queued ahead exactly on GPU devices"
    );
    let theirs = generate(&on_host, &prompts, &sampled, &mut |_, _| Control::Continue).unwrap();
    for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        assert_eq!(a.ids, b.ids, "{family}: sampled continuation of prompt {i}");
    }
    let refilled = GenerateOptions {
        max_batch: Some(3),
        ..sampled.clone()
    };
    let stop = |counts: &mut Vec<usize>, i: usize| {
        counts[i] += 1;
        match counts[i] == stop_after(i) {
            true => Control::Stop,
            false => Control::Continue,
        }
    };
    let mut counts = vec![0; many.len()];
    let ours = generate(&model, &many, &refilled, &mut |i, _| stop(&mut counts, i)).unwrap();
    let mut counts = vec![0; many.len()];
    let theirs = generate(&on_host, &many, &refilled, &mut |i, _| stop(&mut counts, i)).unwrap();
    for (j, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        assert_eq!(
            a.ids, b.ids,
            "{family}: sampled sequence {j} through 3 refilled rows"
        );
        assert_eq!(a.ids.len(), stop_after(j));
    }
    println!("{family}: sampled continuations identical to the host sampler's");
}

/// The device's sampler against the host's on random logits: flat to peaked, with ties, at several temperatures
/// and top-p values, a small vocabulary, one past a block of the kernel and Qwen2.5's. A token may differ only where
/// the draw or the nucleus's edge lies within the f32 sums' rounding of a boundary: then the host's sampler moved
/// by 1e-5 (of the mass, or of top-p) draws it too.
#[test]
fn device_sampling_matches_the_host_sampler() {
    use avb_core::rng::SplitMix64;
    use avb_runtime::sample::{on_device, sample_top_p_at};
    use burn::tensor::{Tensor, TensorData};
    let device = common::test_device();
    let probe = Tensor::<2>::zeros([1, 8], &device);
    if on_device(&probe, &Tensor::zeros([1], &device), 1.0, 1.0).is_none() {
        println!("no device sampler on this device: skipped");
        return;
    }
    let mut rng = SplitMix64::new(3);
    let (mut draws, mut near) = (0, 0);
    for (vocab, rows) in [(50, 8), (4103, 8), (152_064, 4)] {
        for (temperature, top_p) in [(1.0f32, 1.0f32), (0.7, 0.9), (1.3, 0.5), (0.6, 0.02)] {
            for spread in [0.2, 2.0, 10.0] {
                let mut logits: Vec<f32> = (0..rows * vocab)
                    .map(|_| (rng.normal() * spread) as f32)
                    .collect();
                // Exact ties in every other row.
                for r in (0..rows).step_by(2) {
                    for i in 0..vocab / 3 {
                        logits[r * vocab + 3 * i + 1] = logits[r * vocab + 3 * i];
                    }
                }
                let units: Vec<f32> = (0..rows).map(|_| rng.unit_f64() as f32).collect();
                let x =
                    Tensor::<2>::from_data(TensorData::new(logits.clone(), [rows, vocab]), &device);
                let u = Tensor::<1>::from_data(TensorData::new(units.clone(), [rows]), &device);
                let ids = on_device(&x, &u, temperature, top_p).expect("device sampler");
                let ids: Vec<i64> = ids
                    .try_into_data()
                    .unwrap()
                    .convert::<i64>()
                    .try_into_vec()
                    .unwrap();
                for r in 0..rows {
                    let row = &logits[r * vocab..(r + 1) * vocab];
                    let unit = f64::from(units[r]);
                    let host = sample_top_p_at(row, temperature, top_p, unit);
                    draws += 1;
                    if ids[r] as u32 == host {
                        continue;
                    }
                    near += 1;
                    let moved = [
                        sample_top_p_at(row, temperature, top_p, (unit - 1e-5).max(0.0)),
                        sample_top_p_at(row, temperature, top_p, (unit + 1e-5).min(1.0 - 1e-12)),
                        sample_top_p_at(row, temperature, (top_p - 1e-5).max(1e-6), unit),
                        sample_top_p_at(row, temperature, (top_p + 1e-5).min(1.0), unit),
                    ];
                    assert!(
                        moved.contains(&(ids[r] as u32)),
                        "vocab {vocab}, T {temperature}, top-p {top_p}, spread {spread}, row {r}: device {} host {host}",
                        ids[r]
                    );
                }
            }
        }
    }
    println!("{draws} draws, {near} at a boundary within rounding");
    assert!(near * 50 <= draws, "{near} of {draws} draws differ");
}

#[test]
fn qwen2_matches_transformers() {
    check_family("qwen2");
}

#[test]
fn llama_matches_transformers() {
    check_family("llama");
}

#[test]
fn gemma3_matches_transformers() {
    check_family("gemma3");
}
