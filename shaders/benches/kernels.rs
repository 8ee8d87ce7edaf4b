//! Kernel timings on the wgpu device against burn's generic ops on the same inputs, and the fraction of the copy
//! bandwidth measured in the same run: what one launch costs, and how close the quantized matvec gets to the
//! memory bus at the real AV shapes (Qwen2.5-7B's projections).
//!   cargo bench -p avb-shaders --features wgpu --bench kernels
use avb_shaders::{argmax, decode_attention, rms_norm, Epilogue, QuantizedWeight};
use burn::tensor::quantization::{QuantScheme, QuantStore, QuantValue, ScaleDtype};
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use std::time::Instant;

const REPS: usize = 50;

fn sync(device: &Device) {
    device.sync().expect("device sync");
}

/// Median-free mean seconds per call of `f` over REPS calls after three warm-ups, synchronised at both ends.
fn time<T>(device: &Device, mut f: impl FnMut() -> T) -> f64 {
    for _ in 0..3 {
        std::hint::black_box(f());
    }
    sync(device);
    let t = Instant::now();
    for _ in 0..REPS {
        std::hint::black_box(f());
    }
    sync(device);
    t.elapsed().as_secs_f64() / REPS as f64
}

fn main() {
    let device = Device::wgpu(Default::default());
    device.seed(1);
    let n = 1usize << 28;
    let big: Tensor<1> = Tensor::random([n], Distribution::Default, &device);
    let copy = 2.0 * 4.0 * n as f64 / time(&device, || big.clone() + 1.0);
    drop(big);
    println!("copy bandwidth: {:.0} GB/s\n", copy / 1e9);
    println!(
        "| kernel | shape | rows | avb us | avb GB/s | of copy bw | avb TFLOP/s | generic op | generic us | speed-up | f32 matmul us (weight dequantized beforehand) | speed-up |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (bits, value) in [(4u32, QuantValue::Q4S), (8, QuantValue::Q8S)] {
        let scheme = QuantScheme::default()
            .with_value(value)
            .with_store(QuantStore::PackedU32(0))
            .per_block([32], ScaleDtype::F32);
        for (name, k, out) in [
            ("q/o proj", 3584, 3584),
            ("gate/up", 3584, 18944),
            ("down", 18944, 3584),
        ] {
            let w: Tensor<2> = Tensor::random([k, out], Distribution::Normal(0.0, 0.02), &device);
            let wq = w.quantize_dynamic(&scheme);
            let packed = QuantizedWeight::from_tensor(&wq).expect("packed weight");
            let bytes = (k * out) as f64 * (bits as f64 / 8.0 + 4.0 / 32.0);
            for rows in [1usize, 4, 8, 16, 64, 512] {
                let x: Tensor<2> = Tensor::random([rows, k], Distribution::Default, &device);
                let ours = packed
                    .matvec(&x, None, Epilogue::None, None)
                    .map(|_| time(&device, || packed.matvec(&x, None, Epilogue::None, None)));
                // burn's own path: its quantized matmul for 8-bit, the dequantized weight for 4-bit.
                let (generic_name, generic) = if bits == 8 {
                    (
                        "burn quantized matmul",
                        time(&device, || x.clone().matmul(wq.clone())),
                    )
                } else {
                    (
                        "dequantize + matmul",
                        time(&device, || x.clone().matmul(wq.clone().dequantize())),
                    )
                };
                // burn's f32 matmul with the weight dequantized beforehand: what a product costs with no
                // dequantizing in it, at 8x the weight's bytes.
                let dense = wq.clone().dequantize();
                let dense_us = 1e6 * time(&device, || x.clone().matmul(dense.clone()));
                drop(dense);
                let flops = 2.0 * (rows * k * out) as f64;
                let cells = match ours {
                    Some(o) => format!(
                        "{:.1} | {:.0} | {:.1}% | {:.1} | {generic_name} | {:.1} | {:.1}x | {dense_us:.1} | {:.2}x",
                        o * 1e6,
                        bytes / o / 1e9,
                        100.0 * bytes / o / copy,
                        flops / o / 1e12,
                        generic * 1e6,
                        generic / o,
                        dense_us / 1e6 / o
                    ),
                    None => format!(
                        "- | - | - | - | {generic_name} | {:.1} ({:.0} GB/s of weights) | - | {dense_us:.1} | -",
                        generic * 1e6,
                        bytes / generic / 1e9
                    ),
                };
                println!("| q{bits} matvec | {name} {k}x{out} | {rows} | {cells} |");
            }
        }
    }
    let x: Tensor<2> = Tensor::random([1, 3584], Distribution::Default, &device);
    let wn: Tensor<1> = Tensor::random([3584], Distribution::Default, &device);
    let ours = time(&device, || rms_norm(&x, &wn, 1e-6, None).expect("kernel"));
    let generic = time(&device, || {
        let ms = x.clone().square().mean_dim(1);
        x.clone() * (ms + 1e-6).sqrt().recip() * wn.clone().unsqueeze::<2>()
    });
    println!(
        "| rms_norm | d 3584 | 1 | {:.1} | - | - | - | 6 generic ops | {:.1} | {:.1}x | - | - |",
        ours * 1e6,
        generic * 1e6,
        generic / ours
    );
    for b in [1usize, 16] {
        let (h, kvh, hd, cap) = (28, 4, 128, 256);
        let q: Tensor<4> = Tensor::random([b, h, 1, hd], Distribution::Default, &device);
        let keys: Tensor<4> = Tensor::random([b, kvh, cap, hd], Distribution::Default, &device);
        let values: Tensor<4> = Tensor::random([b, kvh, cap, hd], Distribution::Default, &device);
        // No padding; the new position at cache index 199 (200 keys written).
        let mut cursor = vec![0i32; b];
        cursor.push(199);
        let cursor: Tensor<1, Int> = Tensor::from_data(TensorData::new(cursor, [b + 1]), &device);
        let ours = time(&device, || {
            decode_attention(&q, (&keys, &values), &cursor, None, 0.088, None).expect("kernel")
        });
        let generic = time(&device, || {
            let scores = q
                .clone()
                .reshape([b, kvh, h / kvh, hd])
                .matmul(keys.clone().swap_dims(2, 3))
                * 0.088;
            burn::tensor::activation::softmax(scores, 3).matmul(values.clone())
        });
        println!(
            "| decode attention | 28/4 heads x 128, cache 256 | {b} | {:.1} | - | - | - | matmul, softmax, matmul (unmasked) | {:.1} | {:.1}x | - | - |",
            ours * 1e6,
            generic * 1e6,
            generic / ours
        );
    }
    for b in [1usize, 16, 64] {
        let logits: Tensor<2> = Tensor::random([b, 152_064], Distribution::Default, &device);
        let ours = time(&device, || argmax(&logits).expect("kernel"));
        let generic = time(&device, || logits.clone().argmax(1));
        println!(
            "| argmax | vocab 152064 | {b} | {:.1} | - | - | - | burn argmax | {:.1} | {:.1}x | - | - |",
            ours * 1e6,
            generic * 1e6,
            generic / ours
        );
    }
}
