// avbridge in the browser: download a web bundle (progress events, Cache Storage keyed by sha256, one retry on a
// bad download), check it fits the GPU, and open it with the wasm runtime (pkg/, built from crates/avb-web).
// Everything after the download (hash checks again, the model, the verbalizer protocol, decoding) is Rust.

import init, { initGpu, WebVerbalizer, CrossMap, RemoteFeatures, lastPanic } from '../pkg/avb_web.js';

const CACHE = 'avbridge-bundles-v1';
let wasm = null;

/** Load the wasm module once. */
export function ready() {
  wasm ??= init();
  return wasm;
}

async function sha256Hex(bytes) {
  const digest = await crypto.subtle.digest('SHA-256', bytes);
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, '0')).join('');
}

async function download(url, onBytes) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  const reader = response.body.getReader();
  const chunks = [];
  let length = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    length += value.length;
    onBytes(value.length);
  }
  const out = new Uint8Array(length);
  let at = 0;
  for (const c of chunks) {
    out.set(c, at);
    at += c.length;
  }
  return out;
}

/** One bundle file, from Cache Storage when a copy with the right sha256 is there, else downloaded (twice at most). */
async function bundleFile(base, name, entry, onBytes) {
  const url = new URL(name, base).href;
  const cache = globalThis.caches ? await caches.open(CACHE) : null;
  const key = `${url}#sha256=${entry.sha256}`;
  if (cache) {
    const hit = await cache.match(key);
    if (hit) {
      const bytes = new Uint8Array(await hit.arrayBuffer());
      if (bytes.length === entry.bytes && (await sha256Hex(bytes)) === entry.sha256) {
        onBytes(bytes.length);
        return bytes;
      }
      await cache.delete(key);
    }
  }
  for (let attempt = 1; ; attempt++) {
    const bytes = await download(url, onBytes);
    const sha = await sha256Hex(bytes);
    if (bytes.length === entry.bytes && sha === entry.sha256) {
      if (cache) await cache.put(key, new Response(bytes));
      return bytes;
    }
    if (attempt === 2) {
      throw new Error(
        `${name}: the download has ${bytes.length} bytes and sha256 ${sha}, the manifest says ${entry.bytes} bytes ` +
          `and ${entry.sha256} (tried twice; the server may hold a different bundle version)`,
      );
    }
  }
}

/** Largest buffer the bundle needs on the device: a tensor part expanded to f32. */
export function largestBuffer(manifest) {
  let largest = 0;
  for (const t of Object.values(manifest.tensors)) {
    const cols = t.shape.length === 1 ? t.shape[0] : t.encoding === 'quantized_transposed' ? t.shape[0] : t.shape[1];
    for (const p of t.parts) largest = Math.max(largest, (p.rows[1] - p.rows[0]) * cols * 4);
  }
  return largest;
}

/** Is WebGPU there, and are its limits enough for `manifest`? Returns null when fine, else the reason. */
export async function gpuProblem(manifest) {
  if (!navigator.gpu) return 'This browser has no WebGPU (navigator.gpu is missing). Use Chrome or Edge 113+, or enable WebGPU.';
  const adapter = await navigator.gpu.requestAdapter();
  if (!adapter) return 'WebGPU is present but no GPU adapter is available (it may be disabled or blocklisted).';
  const need = largestBuffer(manifest);
  const limit = Math.min(adapter.limits.maxStorageBufferBindingSize, adapter.limits.maxBufferSize);
  if (need > limit) {
    return `This bundle needs GPU buffers of ${(need / 2 ** 20).toFixed(0)} MiB; this GPU allows ${(limit / 2 ** 20).toFixed(0)} MiB. Repack with a smaller part size.`;
  }
  return null;
}

/**
 * Download and open the bundle at `baseUrl` (a directory URL). `onProgress(doneBytes, totalBytes)` follows the
 * download. Resolves to { av, manifest, seconds }.
 */
export async function openBundle(baseUrl, { onProgress = () => {}, precision = 'bundle' } = {}) {
  const base = new URL(baseUrl.endsWith('/') ? baseUrl : `${baseUrl}/`, location.href);
  const manifestBytes = await download(new URL('manifest.json', base).href, () => {});
  const manifest = JSON.parse(new TextDecoder().decode(manifestBytes));
  const problem = await gpuProblem(manifest);
  if (problem) throw new Error(problem);
  await ready();
  await initGpu();
  const total = Object.values(manifest.files).reduce((sum, f) => sum + f.bytes, 0);
  let done = 0;
  const files = new Map();
  for (const [name, entry] of Object.entries(manifest.files)) {
    files.set(
      name,
      await bundleFile(base, name, entry, (n) => {
        done += n;
        onProgress(done, total);
      }),
    );
  }
  const started = performance.now();
  const av = WebVerbalizer.open(manifestBytes, files, precision);
  return { av, manifest, seconds: (performance.now() - started) / 1000 };
}

/** A ridge map (and washout) for the cross-model step, from artifact URLs. */
export async function openCrossMap(mapUrl, washoutUrl) {
  await ready();
  const map = await download(new URL(mapUrl, location.href).href, () => {});
  const washout = washoutUrl ? await download(new URL(washoutUrl, location.href).href, () => {}) : undefined;
  return CrossMap.open(map, washout);
}

async function fetchRange(url, start, end) {
  const response = await fetch(url, { headers: { range: `bytes=${start}-${end - 1}` } });
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  const bytes = new Uint8Array(await response.arrayBuffer());
  if (response.status === 206) {
    const total = Number(response.headers.get('content-range')?.split('/')[1]);
    return { bytes, total };
  }
  // A server without range support sends the whole file.
  return { bytes: bytes.subarray(start, end), total: bytes.length, whole: bytes };
}

/**
 * A feature file read by HTTP range: `saeUrl` is an SAE's sae_weights.safetensors (with `cfgUrl`, its cfg.json),
 * a GemmaScope params.safetensors or a direction .safetensors / .npy. Only the header and the rows asked for are
 * downloaded. Resolves to { count, d, row(i) -> Promise<Float32Array> }.
 */
export async function openRemoteFeatures(saeUrl, cfgUrl) {
  await ready();
  const url = new URL(saeUrl, location.href).href;
  const name = new URL(url).pathname.split('/').pop();
  const cfg = cfgUrl ? new TextDecoder().decode(await download(new URL(cfgUrl, location.href).href, () => {})) : undefined;
  // SAE headers are a few hundred bytes; 64 KiB covers nearly all, and a longer one is fetched in a second request.
  let first = await fetchRange(url, 0, 65536);
  const need = RemoteFeatures.headerBytes(first.bytes);
  if (need === 0) throw new Error(`${url} is neither a safetensors nor an .npy file`);
  if (need > first.bytes.length && !first.whole) first = await fetchRange(url, 0, need);
  const features = RemoteFeatures.open(name, first.total, first.whole ?? first.bytes, cfg);
  return {
    count: features.count,
    d: features.d,
    async row(i) {
      const [start, end] = features.rowRange(i);
      const { bytes } = first.whole ? { bytes: first.whole.subarray(start, end) } : await fetchRange(url, start, end);
      return features.decodeRow(i, bytes);
    },
  };
}

/**
 * A message a reader can act on for an error from the runtime. A Rust panic reaches JS as a bare RuntimeError; its
 * message (GPU out of memory, device lost, ...) was kept by the module, which cannot be used again: reload.
 */
export function describeError(error) {
  const text = String(error?.message ?? error);
  if (!(error instanceof WebAssembly.RuntimeError)) return text;
  const panic = wasm ? lastPanic() ?? text : text;
  if (/out of ?memory|OutOfMemory|allocat/i.test(panic)) {
    return `The GPU ran out of memory for this verbalizer. Close other GPU-heavy tabs, or use a smaller (q4) bundle; then reload the page. (${panic})`;
  }
  if (/device.*lost|lost.*device|DeviceLost/i.test(panic)) {
    return `The GPU device was lost (a driver reset, or the tab was suspended). Reload the page to start again. (${panic})`;
  }
  return `The verbalizer stopped on an internal error; reload the page to start again. (${panic})`;
}
