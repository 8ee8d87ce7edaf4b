//! Each kernel against burn's generic tensor ops on the same device (matrix products on the CPU backend), on fresh
//! random inputs: the quantized matvec against a matmul with the dequantized weight (8- and 4-bit; one tile of rows
//! and several; with and without bias; a k that does not divide into chunks; of RMSNorm(x); with the residual and
//! gated-MLP epilogues), RMSNorm, RoPE (alone and fused with the KV-cache writes, also from the q/k/v product's
//! partial sums), and decode attention with left padding, grouped heads, a sliding window and soft-capping against
//! the masked-softmax formulation, the embedding gather, a recorded step replayed with its inputs written in place,
//! and the f32 product. Runs on wgpu (Mesa lavapipe in CI, a real GPU through Vulkan on the GPU machine):
//! `cargo test -p avb-runtime -p avb-shaders --features avb-runtime/wgpu,avb-shaders/wgpu --test kernels`; with
//! `avb-shaders/vulkan` the kernels compile to SPIR-V, and products of more than 8 rows run on tensor cores where
//! the device has them (checked against the reference with f16-rounded inputs). With `avb-shaders/cuda` and
//! `AVB_TEST_DEVICE=cuda` they run as CUDA C++ (tests/scripts/cuda_build_env.sh prepares the build).
#![cfg(any(feature = "wgpu", feature = "cuda"))]

use avb_shaders::{decode_attention, rms_norm, Activation, Epilogue, QkvSource, QuantizedWeight};
use burn::tensor::quantization::{QuantScheme, QuantStore, QuantValue, QuantizedBytes, ScaleDtype};
use burn::tensor::{activation, Bool, DType, Device, Distribution, Int, Tensor, TensorData};
use half::f16;

/// wgpu unless `AVB_TEST_DEVICE=cuda` (the `cuda` feature: CUDA C++ through NVRTC on the GPU machine).
fn device() -> Device {
    match std::env::var("AVB_TEST_DEVICE").as_deref() {
        #[cfg(feature = "cuda")]
        Ok("cuda") => Device::cuda(0),
        #[cfg(feature = "wgpu")]
        Ok("wgpu") | Err(_) => Device::wgpu(Default::default()),
        other => panic!("AVB_TEST_DEVICE={other:?}: not compiled in (features wgpu / cuda)"),
    }
}

/// a b in f32 on the CPU backend. On CUDA burn's generic matmul stages f32 inputs as TF32 (10-bit mantissas: about
/// 3e-4 relative error here), too coarse a reference for kernels exact to 1e-6.
fn exact_matmul<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> Tensor<D> {
    let (dev, cpu) = (a.device(), Device::flex());
    a.to_device(&cpu).matmul(b.to_device(&cpu)).to_device(&dev)
}

fn host(t: Tensor<2>) -> Vec<f32> {
    t.into_data().try_into_vec::<f32>().unwrap()
}

/// ||a - b|| / ||b||
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    assert!(a.iter().all(|v| v.is_finite()), "non-finite output");
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// t with every value rounded to f16 and back.
fn rounded_to_f16(t: &Tensor<2>) -> Tensor<2> {
    let values = host(t.clone())
        .into_iter()
        .map(|v| f16::from_f32(v).to_f32())
        .collect();
    Tensor::from_data(TensorData::new(values, t.dims()), &t.device())
}

/// The quantized weight as the tensor-core kernel stages it: each field times its block's scale rounded to f16,
/// the product rounded to f16.
fn f16_staged_weight(wq: &Tensor<2>) -> Tensor<2> {
    let data = wq.to_data();
    let DType::QFloat(scheme) = data.dtype() else {
        panic!("a quantized tensor, not {:?}", data.dtype())
    };
    let shape = data.shape().clone();
    let out = shape[1];
    let quantized = QuantizedBytes {
        shape: shape.clone(),
        bytes: data.into_bytes(),
        scheme,
    };
    let (fields, scales) = quantized.into_vec_i8();
    let values = fields
        .iter()
        .enumerate()
        .map(|(i, &field)| {
            let scale =
                f16::from_f32(scales.block[i / out * (out / 32) + i % out / 32].min(65504.0));
            f16::from_f32(field as f32 * scale.to_f32()).to_f32()
        })
        .collect();
    Tensor::from_data(TensorData::new(values, shape), &wq.device())
}

/// The reference product's inputs for x times `packed` (the quantized `wq`, dequantized `w`): x and w as they are,
/// or as the kernel rounds them to f16 where it takes f16 inputs on tensor cores (so the comparison still checks
/// the summation to f32 precision; `F16_ERROR` bounds what the rounding itself changes).
fn reference_inputs(
    packed: &QuantizedWeight,
    x: &Tensor<2>,
    wq: &Tensor<2>,
    w: &Tensor<2>,
) -> (Tensor<2>, Tensor<2>) {
    match packed.rounds_to_f16(x) {
        true => (rounded_to_f16(x), f16_staged_weight(wq)),
        false => (x.clone(), w.clone()),
    }
}

/// The relative error the f16 rounding of both inputs (2^-11 relative each at most) may add to a product over
/// random inputs: about 4e-4 is typical, this bound leaves room.
const F16_ERROR: f64 = 2e-3;

fn scheme(value: QuantValue) -> QuantScheme {
    QuantScheme::default()
        .with_value(value)
        .with_store(QuantStore::PackedU32(0))
        .per_block([32], ScaleDtype::F32)
}

#[test]
fn quantized_matvec_equals_dequantized_matmul() {
    let dev = device();
    dev.seed(3);
    let norm_weights: Vec<f32> = (0..9000).map(|i| 0.5 + (i % 7) as f32 / 7.0).collect();
    for (value, bits) in [(QuantValue::Q8S, 8), (QuantValue::Q4S, 4)] {
        // k = 9000: a single row takes more than the fewest rounds per chunk.
        for (k, out) in [(96, 64), (1000, 320), (2048, 4096), (9000, 64)] {
            let w: Tensor<2> = Tensor::random([k, out], Distribution::Normal(0.0, 0.05), &dev);
            let wq = w.quantize_dynamic(&scheme(value));
            let packed = QuantizedWeight::from_tensor(&wq).expect("a packed quantized weight");
            let reference_w = wq.clone().dequantize();
            let bias: Tensor<1> = Tensor::random([out], Distribution::Normal(0.0, 1.0), &dev);
            // 65 and 200: several tiles of rows, the last one partial (a prefill's rows).
            for rows in [1, 3, 8, 13, 21, 64, 65, 200] {
                let x: Tensor<2> = Tensor::random([rows, k], Distribution::Normal(0.0, 1.0), &dev);
                let (x_in, w_in) = reference_inputs(&packed, &x, &wq, &reference_w);
                for with_bias in [false, true] {
                    let b = with_bias.then_some(&bias);
                    let ours = host(
                        packed
                            .matvec(&x, b, Epilogue::None, None)
                            .expect("the kernel applies"),
                    );
                    let mut reference = exact_matmul(x_in.clone(), w_in.clone());
                    let mut exact = exact_matmul(x.clone(), reference_w.clone());
                    if let Some(b) = b {
                        reference = reference + b.clone().unsqueeze::<2>();
                        exact = exact + b.clone().unsqueeze::<2>();
                    }
                    let err = rel_err(&ours, &host(reference));
                    let f16_err = rel_err(&ours, &host(exact));
                    println!(
                        "q{bits} k {k} out {out} rows {rows} bias {with_bias}: relative error {err:.2e} \
                         (f16 inputs {}: {f16_err:.2e} against f32 inputs)",
                        packed.rounds_to_f16(&x)
                    );
                    assert!(err < 1e-5, "q{bits} k {k} out {out} rows {rows}: {err}");
                    assert!(
                        f16_err < F16_ERROR,
                        "q{bits} k {k} out {out} rows {rows}: {f16_err}"
                    );
                }
                // Of RMSNorm(x): folded into a single row's product, a separate launch before more rows'.
                let (norm, eps) = (&norm_weights[..k], 1e-6);
                let norm = Tensor::<1>::from_data(TensorData::new(norm.to_vec(), [k]), &dev);
                let ours = packed
                    .matvec(&x, None, Epilogue::None, Some((&norm, eps)))
                    .expect("the kernel applies");
                let mean_square = x.clone().square().mean_dim(1);
                let normed = x.clone() * (mean_square + eps).sqrt().recip() * norm.unsqueeze::<2>();
                let (normed, w_in) = reference_inputs(&packed, &normed, &wq, &reference_w);
                let err = rel_err(&host(ours), &host(exact_matmul(normed, w_in)));
                println!("q{bits} k {k} out {out} rows {rows} normed: relative error {err:.2e}");
                // With f16 inputs, the kernel's and the reference's RMSNorm (equal to about 1e-7) round a few values
                // to neighbouring f16s, each a 2^-11 change in one term.
                let tolerance = match packed.rounds_to_f16(&x) {
                    true => 5e-5,
                    false => 1e-5,
                };
                assert!(
                    err < tolerance,
                    "q{bits} k {k} out {out} rows {rows} normed: {err}"
                );
            }
        }
    }
    // A float weight is not a packed one.
    let w: Tensor<2> = Tensor::random([64, 64], Distribution::Default, &dev);
    assert!(QuantizedWeight::from_tensor(&w).is_none());
}

#[test]
fn matvec_epilogues_equal_generic_ops() {
    let dev = device();
    dev.seed(4);
    let (k, half) = (1000, 320);
    let w: Tensor<2> = Tensor::random([k, 2 * half], Distribution::Normal(0.0, 0.05), &dev);
    let wq = w.quantize_dynamic(&scheme(QuantValue::Q4S));
    let packed = QuantizedWeight::from_tensor(&wq).expect("a packed quantized weight");
    let reference_w = wq.clone().dequantize();
    for rows in [1, 3, 8, 13, 21, 64, 65] {
        let x: Tensor<2> = Tensor::random([rows, k], Distribution::Normal(0.0, 1.0), &dev);
        let (x_in, w_in) = reference_inputs(&packed, &x, &wq, &reference_w);
        let product = exact_matmul(x_in, w_in);
        let residual: Tensor<2> = Tensor::random([rows, 2 * half], Distribution::Default, &dev);
        let ours = packed
            .matvec(&x, None, Epilogue::Residual(&residual), None)
            .expect("the kernel applies");
        let err = rel_err(&host(ours), &host(product.clone() + residual));
        println!("residual, rows {rows}: relative error {err:.2e}");
        assert!(err < 1e-5, "residual, rows {rows}: {err}");
        let gate = product.clone().narrow(1, 0, half);
        let up = product.narrow(1, half, half);
        for (act, reference) in [
            (
                Activation::Silu,
                activation::silu(gate.clone()) * up.clone(),
            ),
            (
                Activation::GeluTanh,
                activation::gelu_approximate(gate.clone()) * up.clone(),
            ),
        ] {
            let ours = packed
                .matvec(&x, None, Epilogue::Gated(act), None)
                .expect("the kernel applies");
            assert_eq!(ours.dims(), [rows, half]);
            let err = rel_err(&host(ours), &host(reference));
            println!("{act:?}, rows {rows}: relative error {err:.2e}");
            assert!(err < 1e-5, "{act:?}, rows {rows}: {err}");
        }
    }
    // A residual of another shape is refused (the caller adds it).
    let x: Tensor<2> = Tensor::random([2, k], Distribution::Default, &dev);
    let wrong: Tensor<2> = Tensor::zeros([2, half], &dev);
    assert!(packed
        .matvec(&x, None, Epilogue::Residual(&wrong), None)
        .is_none());
}

#[test]
fn rms_norm_equals_generic_ops() {
    let dev = device();
    dev.seed(5);
    for (rows, d) in [(1, 64), (1, 5376), (7, 576), (3, 5376)] {
        let x: Tensor<3> = Tensor::random([1, rows, d], Distribution::Normal(0.5, 3.0), &dev);
        let w: Tensor<1> = Tensor::random([d], Distribution::Normal(1.0, 0.2), &dev);
        let residual: Tensor<3> = Tensor::random([1, rows, d], Distribution::Default, &dev);
        let eps = 1e-6;
        let ms = x.clone().square().mean_dim(2);
        let normed = x.clone() * (ms + eps).sqrt().recip() * w.clone().unsqueeze::<3>();
        // Alone, and added to a residual in the same launch.
        for (with_residual, reference) in
            [(false, normed.clone()), (true, normed + residual.clone())]
        {
            let ours = rms_norm(&x, &w, eps, with_residual.then_some(&residual))
                .expect("the kernel applies");
            let err = rel_err(
                &host(ours.reshape([rows, d])),
                &host(reference.reshape([rows, d])),
            );
            println!(
                "rms_norm rows {rows} d {d} residual {with_residual}: relative error {err:.2e}"
            );
            assert!(
                err < 1e-6,
                "rows {rows} d {d} residual {with_residual}: {err}"
            );
        }
    }
    // A residual of another shape is refused (the caller keeps its generic path).
    let x: Tensor<2> = Tensor::random([2, 64], Distribution::Default, &dev);
    let w: Tensor<1> = Tensor::ones([64], &dev);
    assert!(rms_norm(&x, &w, 1e-6, Some(&Tensor::zeros([2, 32], &dev))).is_none());
}

/// The generic formulation: scores of every cache position, masked (padding, causality, window), softmax, values.
#[allow(clippy::too_many_arguments)]
fn reference_attention(
    q: Tensor<4>,
    keys: Tensor<4>,
    values: Tensor<4>,
    pads: &[usize],
    total: usize,
    window: Option<usize>,
    scale: f32,
    softcap: Option<f32>,
) -> Tensor<4> {
    let [b, h, _, hd] = q.dims();
    let [_, kvh, cap, _] = keys.dims();
    let g = h / kvh;
    let dev = q.device();
    let q = q.reshape([b, kvh, g, hd]);
    let mut scores = exact_matmul(q, keys.swap_dims(2, 3)) * scale;
    if let Some(c) = softcap {
        scores = (scores / c).tanh() * c;
    }
    let i = total - 1;
    let mut m = Vec::new();
    for &pad in pads {
        for j in 0..cap {
            let visible = j == i || (j < i && j >= pad && window.is_none_or(|w| i - j < w));
            m.push(!visible);
        }
    }
    let mask: Tensor<4, Bool> = Tensor::from_data(TensorData::new(m, [b, 1, 1, cap]), &dev);
    let probs = activation::softmax(
        scores.mask_fill(mask.expand([b, kvh, g, cap]), f32::NEG_INFINITY),
        3,
    );
    exact_matmul(probs, values).reshape([b, h, 1, hd])
}

#[test]
fn decode_attention_equals_masked_softmax() {
    let dev = device();
    dev.seed(11);
    struct Case {
        rows: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        written: usize,
        pads: Vec<usize>,
        window: Option<usize>,
        softcap: Option<f32>,
    }
    let case = |rows, heads, kv_heads, head_dim, capacity, written, pads, window, softcap| Case {
        rows,
        heads,
        kv_heads,
        head_dim,
        capacity,
        written,
        pads,
        window,
        softcap,
    };
    let cases = [
        case(1, 9, 3, 64, 192, 150, vec![0], None, None),
        case(3, 4, 1, 256, 256, 200, vec![0, 17, 60], Some(64), None),
        case(2, 8, 8, 128, 128, 128, vec![5, 0], None, Some(50.0)),
        case(2, 28, 4, 128, 2048, 1500, vec![0, 700], Some(1024), None),
        // A head dimension of 8: two quads, loaded together.
        case(2, 8, 4, 8, 64, 40, vec![3, 0], None, None),
        // Batches whose cubes take a whole group of heads where the shared memory allows (Qwen2.5-7B's heads at
        // batch 64; Gemma-3-27B's at batch 16, with a window and soft-capping).
        case(
            64,
            28,
            4,
            128,
            256,
            200,
            (0..64).map(|r| r * 7 % 90).collect(),
            None,
            None,
        ),
        case(
            16,
            32,
            16,
            128,
            256,
            180,
            (0..16).map(|r| r * 11 % 60).collect(),
            Some(100),
            Some(50.0),
        ),
    ];
    for c in cases {
        let (b, h, kvh, hd, cap, total) = (
            c.rows, c.heads, c.kv_heads, c.head_dim, c.capacity, c.written,
        );
        let (pads, window, softcap) = (&c.pads[..], c.window, c.softcap);
        let q: Tensor<4> = Tensor::random([b, h, 1, hd], Distribution::Normal(0.0, 1.0), &dev);
        let keys: Tensor<4> =
            Tensor::random([b, kvh, cap, hd], Distribution::Normal(0.0, 1.0), &dev);
        let values: Tensor<4> =
            Tensor::random([b, kvh, cap, hd], Distribution::Normal(0.0, 1.0), &dev);
        let mut cursor: Vec<i32> = pads.iter().map(|p| *p as i32).collect();
        cursor.push(total as i32 - 1);
        let cursor: Tensor<1, Int> = Tensor::from_data(TensorData::new(cursor, [b + 1]), &dev);
        let scale = (hd as f32).powf(-0.5);
        let ours = decode_attention(&q, (&keys, &values), &cursor, window, scale, softcap)
            .expect("the kernel applies");
        let reference = reference_attention(q, keys, values, pads, total, window, scale, softcap);
        let err = rel_err(
            &host(ours.reshape([b * h, hd])),
            &host(reference.reshape([b * h, hd])),
        );
        println!("attention b {b} h {h}/{kvh} hd {hd} cache {cap} total {total} window {window:?} softcap {softcap:?}: relative error {err:.2e}");
        assert!(err < 1e-5, "{err}");
    }
}

/// Rotate-half RoPE of x [b, t, heads, hd] into [b, heads, t, hd] with generic ops.
fn generic_rope(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    let hd = x.dims()[3];
    let xs = x.swap_dims(1, 2);
    let half = hd / 2;
    let rotated = Tensor::cat(
        vec![
            xs.clone().narrow(3, half, half).neg(),
            xs.clone().narrow(3, 0, half),
        ],
        3,
    );
    xs * cos.clone() + rotated * sin.clone()
}

fn random_rope_tables(b: usize, t: usize, hd: usize, dev: &Device) -> (Tensor<4>, Tensor<4>) {
    let angles: Tensor<4> = Tensor::random([b, 1, t, hd], Distribution::Uniform(-3.0, 3.0), dev);
    (angles.clone().cos(), angles.sin())
}

#[test]
fn rope_equals_generic_ops() {
    let dev = device();
    dev.seed(13);
    for (b, t, n, hd) in [(1, 1, 28, 128), (2, 7, 4, 256), (3, 5, 9, 64)] {
        let x: Tensor<4> = Tensor::random([b, t, n, hd], Distribution::Normal(0.0, 1.0), &dev);
        let (cos, sin) = random_rope_tables(b, t, hd, &dev);
        let ours = avb_shaders::rope(&x, &cos, &sin).expect("the kernel applies");
        let reference = generic_rope(x, &cos, &sin);
        let err = rel_err(
            &host(ours.reshape([b * n * t, hd])),
            &host(reference.reshape([b * n * t, hd])),
        );
        println!("rope b {b} t {t} heads {n} hd {hd}: relative error {err:.2e}");
        assert!(err < 1e-6, "{err}");
    }
}

/// A table of every position's angles as the cache kernels read it, [positions, hd] (cos of hd / 2 random
/// frequencies, then their sin), and the [b, 1, t, hd] tables of the positions that rows with padding `pads` reach
/// at cache indices at..at + t (index less padding, 0 on padding).
fn position_tables(
    positions: usize,
    hd: usize,
    pads: &[usize],
    (at, t): (usize, usize),
    dev: &Device,
) -> (Tensor<2>, Tensor<4>, Tensor<4>) {
    let freqs: Vec<f32> = (0..hd / 2)
        .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / hd as f32))
        .collect();
    let mut table = Vec::new();
    for p in 0..positions {
        table.extend(freqs.iter().map(|f| (p as f32 * f).cos()));
        table.extend(freqs.iter().map(|f| (p as f32 * f).sin()));
    }
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for &pad in pads {
        for index in at..at + t {
            let p = index.saturating_sub(pad) as f32;
            for _ in 0..2 {
                cos.extend(freqs.iter().map(|f| (p * f).cos()));
                sin.extend(freqs.iter().map(|f| (p * f).sin()));
            }
        }
    }
    let shape = [pads.len(), 1, t, hd];
    (
        Tensor::from_data(TensorData::new(table, [positions, hd]), dev),
        Tensor::from_data(TensorData::new(cos, shape), dev),
        Tensor::from_data(TensorData::new(sin, shape), dev),
    )
}

fn cursor(pads: &[usize], at: usize, dev: &Device) -> Tensor<1, Int> {
    let values: Vec<i32> = pads.iter().chain([&at]).map(|v| *v as i32).collect();
    let n = values.len();
    Tensor::from_data(TensorData::new(values, [n]), dev)
}

#[test]
fn rope_into_cache_equals_rope_and_cache_writes() {
    let dev = device();
    dev.seed(17);
    // One decoding step and a prefill, into a cache already holding other positions, rows with and without
    // padding; with Gemma-3's per-head q/k norms before the rotation, and without.
    let cases = [
        (1, 28, 4, 128, 64, &[0usize][..], 9),
        (5, 4, 2, 64, 16, &[0, 4][..], 3),
    ];
    for ((t, heads, kv_heads, hd, capacity, pads, at), normed) in
        cases.into_iter().flat_map(|c| [(c, false), (c, true)])
    {
        let b = pads.len();
        let width = (heads + 2 * kv_heads) * hd;
        let qkv: Tensor<3> = Tensor::random([b, t, width], Distribution::Normal(0.0, 1.0), &dev);
        let (table, cos, sin) = position_tables(capacity, hd, pads, (at, t), &dev);
        let cache_shape = [b, kv_heads, capacity, hd];
        let keys: Tensor<4> = Tensor::random(cache_shape, Distribution::Default, &dev);
        let values: Tensor<4> = Tensor::random(cache_shape, Distribution::Default, &dev);
        let part = |from: usize, n: usize| {
            qkv.clone()
                .narrow(2, from * hd, n * hd)
                .reshape([b, t, n, hd])
        };
        let eps = 1e-6;
        let q_norm: Tensor<1> = Tensor::random([hd], Distribution::Uniform(0.5, 1.5), &dev);
        let k_norm: Tensor<1> = Tensor::random([hd], Distribution::Uniform(0.5, 1.5), &dev);
        let head_norm = |x: Tensor<4>, w: &Tensor<1>| {
            if !normed {
                return x;
            }
            let mean_square = x.clone().square().mean_dim(3);
            x * (mean_square + eps).sqrt().recip() * w.clone().unsqueeze::<4>()
        };
        let slot = [0..b, 0..kv_heads, at..at + t, 0..hd];
        let q_ref = generic_rope(head_norm(part(0, heads), &q_norm), &cos, &sin);
        let k_ref = keys.clone().slice_assign(
            slot.clone(),
            generic_rope(head_norm(part(heads, kv_heads), &k_norm), &cos, &sin),
        );
        let v_ref = values
            .clone()
            .slice_assign(slot, part(heads + kv_heads, kv_heads).swap_dims(1, 2));
        // The kernel writes the caches in place: hand it copies nothing else holds.
        let (keys, values) = (keys.clone().add_scalar(0.0), values.clone().add_scalar(0.0));
        let norms = normed.then_some((&q_norm, &k_norm, eps as f32));
        let at_cursor = cursor(pads, at, &dev);
        let (Some(q), k, v) = avb_shaders::rope_into_cache(
            QkvSource::Output(&qkv),
            &table,
            &at_cursor,
            heads,
            (keys, values),
            norms,
        ) else {
            panic!("the kernel applies");
        };
        for (name, ours, reference) in [("q", q, q_ref), ("keys", k, k_ref), ("values", v, v_ref)] {
            let n = ours.dims().iter().product::<usize>();
            let err = rel_err(
                &host(ours.reshape([1, n])),
                &host(reference.reshape([1, n])),
            );
            println!("rope into cache t {t} pads {pads:?} normed {normed} {name}: relative error {err:.2e}");
            assert!(err < 1e-6, "{name}: {err}");
        }
    }
    // A cache buffer another tensor still holds is given back untouched.
    let (b, t, heads, kv_heads, hd) = (1, 1, 2, 1, 64);
    let qkv: Tensor<3> = Tensor::random(
        [b, t, (heads + 2 * kv_heads) * hd],
        Distribution::Default,
        &dev,
    );
    let (table, _, _) = position_tables(8, hd, &[0], (0, t), &dev);
    let keys: Tensor<4> = Tensor::zeros([b, kv_heads, 8, hd], &dev);
    let held = keys.clone();
    let (q, back, _) = avb_shaders::rope_into_cache(
        QkvSource::Output(&qkv),
        &table,
        &cursor(&[0], 0, &dev),
        heads,
        (keys, held.clone().add_scalar(0.0)),
        None,
    );
    assert!(q.is_none(), "a shared cache buffer must not be written");
    assert_eq!(host(back.reshape([1, 8 * hd])), vec![0.0; 8 * hd]);
    drop(held);
}

/// The fused q/k/v projection's partial sums and bias handed to `rope_into_cache`, which adds them up itself: the
/// same q and cache writes, bit for bit, as from the summed product (a decoding step's single row, and a prefill's
/// rows through the tiled kernel); declined with per-head norms.
#[test]
fn rope_into_cache_adds_partial_sums() {
    let dev = device();
    dev.seed(23);
    let (heads, kv_heads, hd, k, capacity) = (8, 2, 64, 512, 32);
    let width = (heads + 2 * kv_heads) * hd;
    let w: Tensor<2> = Tensor::random([k, width], Distribution::Normal(0.0, 0.05), &dev);
    let packed = QuantizedWeight::from_tensor(&w.quantize_dynamic(&scheme(QuantValue::Q4S)))
        .expect("a packed quantized weight");
    let bias: Tensor<1> = Tensor::random([width], Distribution::Normal(0.0, 1.0), &dev);
    for (pads, t, at) in [(&[0usize][..], 1, 7), (&[0, 3][..], 20, 4)] {
        let b = pads.len();
        let x: Tensor<2> = Tensor::random([b * t, k], Distribution::Normal(0.0, 1.0), &dev);
        let summed = packed
            .matvec(&x, Some(&bias), Epilogue::None, None)
            .expect("the product")
            .reshape([b, t, width]);
        let sums = packed.partial_sums(&x, None).expect("the partial sums");
        let (table, _, _) = position_tables(capacity, hd, pads, (at, t), &dev);
        let at_cursor = cursor(pads, at, &dev);
        let cache: Tensor<4> =
            Tensor::random([b, kv_heads, capacity, hd], Distribution::Default, &dev);
        let run = |source: QkvSource<'_>| {
            let caches = (cache.clone().add_scalar(0.0), cache.clone().add_scalar(0.0));
            let (q, keys, values) =
                avb_shaders::rope_into_cache(source, &table, &at_cursor, heads, caches, None);
            let q = q.expect("the kernel applies");
            [q, keys, values].map(|t| {
                let n = t.dims().iter().product::<usize>();
                host(t.reshape([1, n]))
            })
        };
        let from_output = run(QkvSource::Output(&summed));
        let from_sums = run(QkvSource::Partial {
            sums: &sums,
            bias: Some(&bias),
            t,
        });
        for (name, ours, reference) in [
            ("q", &from_sums[0], &from_output[0]),
            ("keys", &from_sums[1], &from_output[1]),
            ("values", &from_sums[2], &from_output[2]),
        ] {
            assert_eq!(ours, reference, "{name} from partial sums, t {t}");
        }
        println!("rope into cache from partial sums, t {t}: q, keys and values equal to the summed product's");
    }
    // Per-head norms would have every thread add up a whole head: declined, the caches untouched.
    let x: Tensor<2> = Tensor::random([1, k], Distribution::Normal(0.0, 1.0), &dev);
    let sums = packed.partial_sums(&x, None).expect("the partial sums");
    let (table, _, _) = position_tables(capacity, hd, &[0], (0, 1), &dev);
    let norm: Tensor<1> = Tensor::ones([hd], &dev);
    let cache: Tensor<4> = Tensor::zeros([1, kv_heads, capacity, hd], &dev);
    let (q, keys, _) = avb_shaders::rope_into_cache(
        QkvSource::Partial {
            sums: &sums,
            bias: None,
            t: 1,
        },
        &table,
        &cursor(&[0], 0, &dev),
        heads,
        (cache.clone(), cache.clone()),
        Some((&norm, &norm, 1e-6)),
    );
    assert!(
        q.is_none(),
        "partial sums with per-head norms must be declined"
    );
    let n = kv_heads * capacity * hd;
    assert_eq!(host(keys.reshape([1, n])), vec![0.0; n]);
}

/// Embedding rows from ids on the device, the table in three ranges, scaled (Gemma) and not.
#[test]
fn gather_rows_equals_select() {
    let dev = device();
    dev.seed(19);
    let (vocab, d) = (300, 96);
    let table: Tensor<2> = Tensor::random([vocab, d], Distribution::Normal(0.0, 1.0), &dev);
    let ranges = [0..128, 128..256, 256..300];
    let parts: Vec<Tensor<2>> = ranges
        .iter()
        .map(|r| table.clone().narrow(0, r.start, r.len()))
        .collect();
    let with_starts: Vec<(&Tensor<2>, usize)> = parts
        .iter()
        .zip(&ranges)
        .map(|(p, r)| (p, r.start))
        .collect();
    let ids = [299i32, 0, 127, 128, 5, 256, 200];
    let n = ids.len();
    let id_t: Tensor<1, Int> = Tensor::from_data(TensorData::new(ids.to_vec(), [n]), &dev);
    for scale in [1.0f32, 3.5] {
        let ours =
            avb_shaders::gather_rows(&with_starts, &id_t, scale).expect("the kernel applies");
        let reference = table.clone().select(0, id_t.clone()) * scale;
        assert_eq!(host(ours), host(reference), "scale {scale}");
    }
}

/// A step recorded once and replayed reads its inputs from buffers written in place between replays.
#[test]
fn recorded_steps_replay_with_inputs_written_in_place() {
    let dev = device();
    dev.seed(23);
    let (vocab, d) = (64, 32);
    let table: Tensor<2> = Tensor::random([vocab, d], Distribution::Normal(0.0, 1.0), &dev);
    let parts = [(&table, 0usize)];
    let ids: Tensor<1, Int> = Tensor::from_data(TensorData::new(vec![1i32, 2], [2]), &dev);
    let step = || {
        let x = avb_shaders::gather_rows(&parts, &ids, 2.0).expect("the kernel applies");
        avb_shaders::argmax(&x).expect("the kernel applies")
    };
    let recording = avb_shaders::Recording::prepare(&ids)
        .expect("a CubeCL device")
        .expect("the stream takes a recording");
    let warm = step();
    recording.start().expect("recording starts");
    let out = step();
    let graph = recording.finish().expect("the recording seals");
    let reference = |rows: &[i32]| -> Vec<i64> {
        let r: Tensor<1, Int> = Tensor::from_data(TensorData::new(rows.to_vec(), [2]), &dev);
        table
            .clone()
            .select(0, r)
            .argmax(1)
            .into_data()
            .convert::<i64>()
            .try_to_vec()
            .unwrap()
    };
    let read = |t: &Tensor<2, Int>| -> Vec<i64> {
        t.clone().into_data().convert::<i64>().try_to_vec().unwrap()
    };
    assert_eq!(read(&warm), reference(&[1, 2]));
    for rows in [[7i32, 9], [63, 0], [5, 5]] {
        assert!(avb_shaders::write_i32(&ids, &rows));
        graph.replay().expect("replay");
        assert_eq!(read(&out), reference(&rows), "rows {rows:?}");
    }
}

#[test]
fn argmax_equals_burns_argmax_with_ties_to_the_first() {
    let dev = device();
    dev.seed(7);
    // Values on a coarse grid tie often; widths below, at and past the cube's 256 threads.
    for (rows, n) in [(1, 5), (3, 256), (4, 1000), (2, 152_064)] {
        let x: Tensor<2> = Tensor::random([rows, n], Distribution::Uniform(0.0, 8.0), &dev).floor();
        let ours = avb_shaders::argmax(&x).expect("the kernel applies");
        let want = x.clone().argmax(1);
        assert_eq!(
            ours.into_data()
                .convert::<i64>()
                .try_to_vec::<i64>()
                .unwrap(),
            want.into_data()
                .convert::<i64>()
                .try_to_vec::<i64>()
                .unwrap(),
            "{rows} x {n}"
        );
    }
    // Maxima tied across the kernel's blocks of 4096 (the first block's copy is not the first), and one at the
    // very end of a row.
    let n = 20_000;
    let mut v = vec![0.0f32; 2 * n];
    v[9000] = 1.0;
    v[5000] = 1.0;
    v[12_288] = 1.0;
    v[2 * n - 1] = 2.0;
    let x: Tensor<2> = Tensor::from_data(TensorData::new(v, [2, n]), &dev);
    let ours = avb_shaders::argmax(&x).expect("the kernel applies");
    let ids = ours
        .into_data()
        .convert::<i64>()
        .try_to_vec::<i64>()
        .unwrap();
    assert_eq!(ids, vec![5000, n as i64 - 1]);
}

/// The f32 product against the CPU's: batched, with a transposed rhs view (attention's k^T), a rhs shared by every
/// batch (a projection), and sizes that leave partial tiles. The runtime takes it where burn's generic matmul rounds
/// f32 to TF32, which is CUDA only.
#[test]
fn matmul_f32_equals_the_cpu_product() {
    let dev = device();
    dev.seed(9);
    let lhs: Tensor<4> = Tensor::random([2, 3, 37, 70], Distribution::Normal(0.0, 1.0), &dev);
    // Only CUDA has TF32 (on Ampere and later).
    if std::env::var("AVB_TEST_DEVICE").as_deref() != Ok("cuda") {
        assert!(!avb_shaders::matmul_rounds_to_tf32(&lhs));
    }
    let keys: Tensor<4> = Tensor::random([2, 3, 45, 70], Distribution::Normal(0.0, 1.0), &dev);
    let shared: Tensor<4> = Tensor::random([1, 1, 70, 130], Distribution::Normal(0.0, 1.0), &dev);
    for (name, rhs) in [("k^T", keys.swap_dims(2, 3)), ("shared", shared)] {
        let ours = avb_shaders::matmul_f32(&lhs, &rhs).expect("the f32 product applies");
        let want = exact_matmul(lhs.clone(), rhs);
        assert_eq!(ours.dims(), want.dims());
        let flat = |t: Tensor<4>| -> Vec<f32> { t.into_data().try_into_vec::<f32>().unwrap() };
        let err = rel_err(&flat(ours), &flat(want));
        println!("matmul_f32 {name}: relative error {err:.2e}");
        assert!(err < 1e-6, "matmul_f32 {name}: {err}");
    }
}
