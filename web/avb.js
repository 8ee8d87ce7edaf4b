// avbridge in the browser: download a web bundle (progress events, Cache Storage keyed by sha256, one retry on a
// bad download), check it fits the GPU, and open it with the wasm runtime (pkg/, built from crates/avb-web).
// Everything after the download (hash checks again, the model, the verbalizer protocol, decoding) is Rust.

import init, { initGpu, WebVerbalizer, CrossMap } from '../pkg/avb_web.js';

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
