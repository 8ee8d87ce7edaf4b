// <av-explain>: explain one feature with an activation verbalizer, in the reader's browser.
//
//   <script type="module" src="web/av-explain.js"></script>
//   <av-explain bundle="bundles/qwen-q8/" feature="features/12.json" map="map.safetensors"
//               washout="washout.safetensors" condition="cross-washout" washout-weight="0.5"></av-explain>
//
// `feature` is a JSON file with the feature's decoder row in the source model's residual space ("direction") and
// optionally "id" and "label". Instead, `sae` (an SAE's sae_weights.safetensors, with `sae-cfg` its cfg.json, a
// GemmaScope params.safetensors or a direction .safetensors / .npy) and `feature-index` read that one row by HTTP
// range requests, without downloading the file. `condition` is native (the row is already in the AV's space), cross (through `map`)
// or cross-washout (through `map`, mixed with `washout` at `washout-weight`). Decoding is greedy unless
// `temperature` is above 0 (then nucleus sampling with `top-p`, default 0.9, from `seed`). Model text is inserted
// as text. When done the element fires `av-done` with the explanation record (`explanation`, `raw`, `tokens`,
// `finish`, ... and `steps`: how many decoding steps were replayed from a recording, how many of those were queued
// before the previous step's token was read, and how many launched kernel by kernel); failures fire `av-error`.

import { describeError, openBundle, openCrossMap, openRemoteFeatures } from './avb.js';

// One download and one model per bundle URL, shared by every widget of the page.
const bundles = new Map();
const maps = new Map();
const saes = new Map();

function shared(cache, key, open) {
  if (!cache.has(key)) cache.set(key, open().catch((e) => { cache.delete(key); throw e; }));
  return cache.get(key);
}

const TEMPLATE = `
  <style>
    :host { display: block; font: 14px/1.4 system-ui, sans-serif; border: 1px solid #ccc; border-radius: 6px; padding: 10px; }
    .row { display: flex; gap: 8px; align-items: center; flex-wrap: wrap; }
    .text { white-space: pre-wrap; margin: 8px 0; min-height: 1.4em; }
    .error { color: #a00; }
    .meta { color: #666; font-size: 12px; }
    progress { width: 160px; }
  </style>
  <div class="row">
    <button part="explain" class="go">Explain</button>
    <button part="stop" class="stop" disabled>Stop</button>
    <progress class="progress" max="1" value="0" hidden></progress>
    <span class="status meta"></span>
  </div>
  <div class="text" part="text"></div>
  <div class="error" part="error"></div>
  <div class="meta stats"></div>`;

class AvExplain extends HTMLElement {
  connectedCallback() {
    if (this.shadowRoot) return;
    const root = this.attachShadow({ mode: 'open' });
    root.innerHTML = TEMPLATE;
    this.$ = (sel) => root.querySelector(sel);
    this.$('.go').addEventListener('click', () => this.explain());
    this.$('.stop').addEventListener('click', () => { this.cancelled = true; });
    if (this.hasAttribute('autostart')) this.explain();
  }

  status(text) {
    this.$('.status').textContent = text;
  }

  fail(message) {
    this.$('.error').textContent = message;
    this.status('');
    this.dispatchEvent(new CustomEvent('av-error', { detail: { message } }));
  }

  async saeRow(saeUrl) {
    const index = Number(this.getAttribute('feature-index') ?? NaN);
    if (!Number.isInteger(index) || index < 0) throw new Error('`sae` needs a `feature-index` attribute (the row to explain)');
    const cfgUrl = this.getAttribute('sae-cfg') ?? undefined;
    const sae = await shared(saes, `${new URL(saeUrl, location.href).href}|${cfgUrl ?? ''}`, () => openRemoteFeatures(saeUrl, cfgUrl));
    if (index >= sae.count) throw new Error(`feature-index ${index}: the SAE has ${sae.count} features`);
    return sae.row(index);
  }

  async explain() {
    const bundleUrl = this.getAttribute('bundle');
    const featureUrl = this.getAttribute('feature');
    const condition = this.getAttribute('condition') ?? 'cross';
    const weight = Number(this.getAttribute('washout-weight') ?? '1');
    const maxTokens = Number(this.getAttribute('max-tokens') ?? '0');
    // Greedy unless a temperature is given; then nucleus sampling from a seed.
    const temperature = Number(this.getAttribute('temperature') ?? '0');
    const topP = Number(this.getAttribute('top-p') ?? '0.9');
    const seed = Number(this.getAttribute('seed') ?? '0');
    this.$('.go').disabled = true;
    this.$('.error').textContent = '';
    this.$('.text').textContent = '';
    this.$('.stats').textContent = '';
    this.cancelled = false;
    const progress = this.$('.progress');
    try {
      const saeUrl = this.getAttribute('sae');
      if (!bundleUrl || !(featureUrl || saeUrl)) throw new Error('<av-explain> needs a `bundle` attribute and `feature` (or `sae` with `feature-index`)');
      const direction = saeUrl ? await this.saeRow(saeUrl) : (await (await fetch(featureUrl)).json()).direction;
      progress.hidden = false;
      this.status('downloading the verbalizer…');
      const { av } = await shared(bundles, new URL(bundleUrl, location.href).href, () =>
        openBundle(bundleUrl, {
          onProgress: (done, total) => {
            progress.value = done / total;
            this.status(`downloading the verbalizer: ${(done / 2 ** 20).toFixed(0)} / ${(total / 2 ** 20).toFixed(0)} MiB`);
          },
        }),
      );
      progress.hidden = true;
      let vector = Float32Array.from(direction);
      if (condition !== 'native') {
        const mapUrl = this.getAttribute('map');
        if (!mapUrl) throw new Error(`condition ${condition} needs a \`map\` attribute (a ridge map into the verbalizer's space)`);
        const washoutUrl = condition === 'cross-washout' ? this.getAttribute('washout') : undefined;
        if (condition === 'cross-washout' && !washoutUrl) throw new Error('condition cross-washout needs a `washout` attribute');
        const cross = await shared(maps, `${mapUrl}|${washoutUrl ?? ''}`, () => openCrossMap(mapUrl, washoutUrl));
        cross.checkVerbalizer(av);
        vector = await cross.vector(vector, condition, weight);
      }
      this.status('explaining…');
      this.$('.stop').disabled = false;
      const started = performance.now();
      let first = null;
      let tokens = 0;
      const result = JSON.parse(
        await av.explain(vector, maxTokens, (text) => {
          first ??= performance.now();
          tokens += 1;
          this.$('.text').textContent = text;
          return !this.cancelled;
        }, temperature, topP, seed),
      );
      const seconds = (performance.now() - started) / 1000;
      const rate = tokens > 1 ? (tokens - 1) / ((performance.now() - first) / 1000) : 0;
      this.$('.text').textContent = result.explanation;
      this.$('.stats').textContent =
        `${result.tokens} tokens in ${seconds.toFixed(1)} s (first token ${((first - started) / 1000).toFixed(1)} s, ${rate.toPrecision(2)} tokens/s, ` +
        `${result.steps.replayed} of ${result.steps.replayed + result.steps.launched} steps replayed, ${result.steps.ahead} queued ahead), ${result.finish}`;
      this.status('');
      this.dispatchEvent(new CustomEvent('av-done', { detail: result }));
    } catch (e) {
      progress.hidden = true;
      this.fail(describeError(e));
    } finally {
      this.$('.go').disabled = false;
      this.$('.stop').disabled = true;
    }
  }
}

customElements.define('av-explain', AvExplain);
