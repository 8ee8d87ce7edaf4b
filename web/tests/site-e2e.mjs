// End-to-end test of a site written by `avb site build` and served by `avb site serve`: open a feature page in
// Chromium with WebGPU (SwiftShader), click Explain on its cross-washout widget, and require the streamed greedy
// explanation to equal `avb explain`'s on the same bundle, map, washout and weight (same text, same token count, same
// finish), its decoding steps replayed from a recording after the first and queued ahead of the host's reads. Then
// open the page without WebGPU and require the widget's clear message, and point the cross widget at OTHER_MAP (a
// map into another model's space) and require it to be refused. Screenshots land in OUT.
//   node web/tests/site-e2e.mjs BASE_URL PAGE EXPECTED_JSONL OUT OTHER_MAP
import fs from 'node:fs';
import path from 'node:path';
import { launch } from './browser.mjs';

const [base, page, expectedPath, out, otherMap] = process.argv.slice(2);
const expected = JSON.parse(fs.readFileSync(expectedPath, 'utf8').trim().split('\n')[0]);
const budget = expected.settings.max_new_tokens;
const failures = [];

/** Click Explain on the widget of `condition` (after `setup(widget)` in the page) and wait for its outcome. */
async function explainOnPage(webgpu, screenshot, condition, attributes) {
  const browser = await launch(webgpu);
  try {
    const tab = await browser.newPage({ viewport: { width: 900, height: 800 } });
    tab.on('console', (m) => console.log(`[page] ${m.text()}`));
    await tab.goto(new URL(page, base).href);
    const selector = `av-explain[condition="${condition}"]`;
    await tab.waitForSelector(selector);
    const streamed = [];
    await tab.exposeFunction('avbStreamed', (text) => streamed.push(text));
    const result = await tab.evaluate(
      ([selector, attributes]) =>
        new Promise((ok) => {
          const widget = document.querySelector(selector);
          for (const [k, v] of Object.entries(attributes)) widget.setAttribute(k, v);
          new MutationObserver(() => window.avbStreamed(widget.shadowRoot.querySelector('.text').textContent))
            .observe(widget.shadowRoot.querySelector('.text'), { childList: true, characterData: true, subtree: true });
          widget.addEventListener('av-done', (e) => ok({ done: e.detail, stats: widget.shadowRoot.querySelector('.stats').textContent }));
          widget.addEventListener('av-error', (e) => ok({ error: e.detail.message }));
          widget.shadowRoot.querySelector('.go').click();
        }),
      [selector, attributes],
    );
    await tab.screenshot({ path: path.join(out, screenshot), fullPage: true });
    return { ...result, streamed };
  } finally {
    await browser.close();
  }
}

const gpu = await explainOnPage(true, 'site-webgpu.png', 'cross-washout', { 'max-tokens': String(budget) });
console.log(JSON.stringify(gpu.done ?? gpu));
if (gpu.error) {
  failures.push(`the widget failed: ${gpu.error}`);
} else {
  const { raw, tokens, finish } = gpu.done;
  if (raw !== expected.raw || tokens !== expected.tokens || finish !== expected.finish) {
    failures.push(`browser ${JSON.stringify({ raw, tokens, finish })} vs native ${JSON.stringify({ raw: expected.raw, tokens: expected.tokens, finish: expected.finish })}`);
  } else {
    console.log(`ok: the browser's greedy explanation equals avb explain's: ${tokens} tokens, finish ${finish}: ${JSON.stringify(raw)}`);
    console.log(`ok: ${gpu.stats}`);
  }
  // Decoding steps after the first few are replayed from a recording (CubeCL graphs on WebGPU).
  const steps = gpu.done.steps;
  if (!(steps?.replayed > 0)) failures.push(`no decoding step was replayed: ${JSON.stringify(steps)}`);
  else console.log(`ok: ${steps.replayed} of ${steps.replayed + steps.launched} decoding steps replayed`);
  // Greedy with one input: replayed steps are queued before the previous step's token is read.
  if (!(steps?.ahead > 0)) failures.push(`no decoding step was queued ahead: ${JSON.stringify(steps)}`);
  else console.log(`ok: ${steps.ahead} decoding steps queued ahead of the host's read`);
  // Streaming: the text grows through prefixes of the final explanation.
  const prefixes = gpu.streamed.filter((t) => t.length > 0);
  if (prefixes.length < 2 || !prefixes.every((t, i) => i === 0 || t.startsWith(prefixes[i - 1].trimEnd()) || gpu.done.explanation === t)) {
    failures.push(`the explanation did not stream (${prefixes.length} updates)`);
  } else {
    console.log(`ok: streamed in ${prefixes.length} updates`);
  }
}

const none = await explainOnPage(false, 'site-no-webgpu.png', 'cross-washout', {});
if (none.error?.includes('WebGPU')) console.log(`ok: without WebGPU the widget says: ${none.error}`);
else failures.push(`without WebGPU: expected a clear WebGPU message, got ${JSON.stringify(none)}`);

const mismatch = await explainOnPage(true, 'site-map-mismatch.png', 'cross', { map: otherMap });
if (mismatch.error?.includes('the map targets')) console.log(`ok: a map into another model is refused: ${mismatch.error}`);
else failures.push(`a map into another model: expected a refusal, got ${JSON.stringify(mismatch.error ?? mismatch.done)}`);

for (const f of failures) console.log(`FAIL: ${f}`);
process.exit(failures.length ? 1 : 0);
