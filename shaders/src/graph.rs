//! Recording a decoding step once and replaying it: CubeCL's graphs. On wgpu a replay re-encodes the recorded
//! dispatches from prebuilt pipelines and bind groups, skipping the per-launch work of burn, CubeCL and wgpu's
//! validation (about 20 µs a launch, 300 launches a step for a 7B model); CUDA replays a CUDA graph. A replay
//! reruns the kernels on the buffers they were recorded with, so a recorded step reads its inputs from
//! buffers written in place between replays ([`write_i32`]) and takes none from the host.

use crate::cube::{empty_like, from_cube_int, to_cube, to_cube_int};
use burn::tensor::{DType, Int, Tensor as BurnTensor};
use burn_cubecl::cubecl;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use cubecl::bytes::Bytes;
use cubecl::calculate_cube_count_elemwise;
use cubecl::client::{Client, Graph};
use cubecl::prelude::*;

/// Write `values` into the buffer of `t` in place (same device memory, so a recorded step that reads it sees
/// them), ordered after the work queued before. False off a CubeCL device or when the lengths differ.
pub fn write_i32(t: &BurnTensor<1, Int>, values: &[i32]) -> bool {
    let Some(c) = to_cube_int(t) else {
        return false;
    };
    if t.dims() != [values.len()] || c.dtype != DType::I32 {
        return false;
    }
    write_bytes(&c, values.iter().flat_map(|v| v.to_le_bytes()).collect());
    true
}

/// `write_i32` for f32 values (a sampled step's draws).
pub fn write_f32(t: &BurnTensor<1>, values: &[f32]) -> bool {
    let Some(c) = to_cube(t) else {
        return false;
    };
    if t.dims() != [values.len()] || c.dtype != DType::F32 {
        return false;
    }
    write_bytes(&c, values.iter().flat_map(|v| v.to_le_bytes()).collect());
    true
}

fn write_bytes(c: &CubeTensor, bytes: Vec<u8>) {
    c.client.write(&c.handle, Bytes::from_bytes_vec(bytes));
}

/// The first lines of a CubeCL server error (its backtrace left out).
fn message(e: impl std::fmt::Display) -> String {
    let text = e.to_string();
    text.split("\nBacktrace:")
        .next()
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// A recording in progress on this thread's stream: [`Recording::prepare`] before a warm-up run of the step (whose
/// allocations leave the memory pools the recording draws from), [`Recording::start`] before the run to record,
/// [`Recording::finish`] after it. Dropped unfinished, it closes the capture and records nothing.
pub struct Recording {
    client: Option<Client>,
}

impl Recording {
    /// Prepare the stream of `anchor`'s device; `None` off a CubeCL device.
    pub fn prepare(anchor: &BurnTensor<1, Int>) -> Option<Result<Recording, String>> {
        let client = to_cube_int(anchor)?.client;
        Some(match client.graph_prepare() {
            Ok(()) => Ok(Recording {
                client: Some(client),
            }),
            Err(e) => Err(message(e)),
        })
    }

    /// From here until `finish`, launches on this thread's stream are recorded instead of run.
    pub fn start(&self) -> Result<(), String> {
        match &self.client {
            Some(c) => c.start_capture().map_err(message),
            None => Err("the recording is over".into()),
        }
    }

    /// The recorded step, or why it could not be sealed (an operation inside the window that a graph cannot
    /// hold: a host write or read, or an allocation the pools could not serve).
    pub fn finish(mut self) -> Result<StepGraph, String> {
        let client = self.client.take().ok_or("the recording is over")?;
        let graph = client.stop_capture().map_err(message)?;
        Ok(StepGraph { graph })
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            // Closing an abandoned capture: its error only says that nothing was recorded.
            let _ = c.stop_capture();
        }
    }
}

/// A recorded step. It must not outlive the buffers it was recorded with (the caller holds them: weights, caches,
/// input and output tensors); CubeCL keeps the memory of its intermediate buffers reserved while it lives.
pub struct StepGraph {
    graph: Graph,
}

impl StepGraph {
    /// Queue the recorded launches again, on the stream they were recorded on (this thread's).
    pub fn replay(&self) -> Result<(), String> {
        // SAFETY: the buffers the step was recorded with are alive (the caller holds them for the graph's life,
        // see `StepGraph`), and one thread drives the stream, so no other work touches them during the replay.
        unsafe { self.graph.replay() }.map_err(message)
    }
}

#[cube(launch)]
fn copy_i32_kernel(src: &Tensor<i32>, dst: &mut Tensor<i32>) {
    let i = ABSOLUTE_POS;
    if i < dst.len() {
        dst[i] = src[i];
    }
}

/// Copy the i32 values of `src` into the buffer of `dst` in place (a step's chosen ids into the ids the next step
/// reads, inside the recording, so that replays chain on the device). False off a CubeCL device or where the
/// element counts or dtypes differ.
pub fn copy_i32_into<const D: usize>(src: &BurnTensor<D, Int>, dst: &BurnTensor<1, Int>) -> bool {
    let (Some(s), Some(d)) = (to_cube_int(src), to_cube_int(dst)) else {
        return false;
    };
    if src.dims().iter().product::<usize>() != dst.dims()[0]
        || s.dtype != DType::I32
        || d.dtype != DType::I32
    {
        return false;
    }
    launch_copy_i32(s, d);
    true
}

/// A copy of `src` (i32) in a buffer of its own: a replayed step's chosen ids, kept from the next replay, which
/// writes the same buffer. `None` off a CubeCL device or for another dtype.
pub fn snapshot_i32<const D: usize>(src: &BurnTensor<D, Int>) -> Option<BurnTensor<D, Int>> {
    let s = to_cube_int(src)?;
    if s.dtype != DType::I32 {
        return None;
    }
    let copy = empty_like(&s, [src.dims().iter().product::<usize>()], DType::I32);
    launch_copy_i32(s, copy.clone());
    Some(from_cube_int::<1>(copy).reshape(src.dims()))
}

/// `dst`'s elements from `src`'s, in order (same count, both i32).
fn launch_copy_i32(src: CubeTensor, dst: CubeTensor) {
    let src = into_contiguous(src);
    let dim = CubeDim::new_1d(64);
    let client = dst.client.clone();
    let count = calculate_cube_count_elemwise(&client, dst.meta.num_elements(), dim);
    copy_i32_kernel::launch(
        &client,
        count,
        dim,
        src.into_tensor_arg(),
        dst.into_tensor_arg(),
    );
}
