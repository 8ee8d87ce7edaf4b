// End-to-end test of a site written by `avb site build` and served by `avb site serve`: open a feature page in
// Chromium with WebGPU (SwiftShader), click Explain on its cross-washout widget, and require the streamed greedy
// explanation to equal `avb explain`'s on the same bundle, map, washout and weight (same text, same token count, same
// finish). Then open the page without WebGPU and require the widget's clear message. Screenshots land in OUT.
//   node web/tests/site-e2e.mjs BASE_URL PAGE EXPECTED_JSONL OUT
import fs from 'node:fs';
import path from 'node:path';
import { launch } from './browser.mjs';

const [base, page, expectedPath, out] = process.argv.slice(2);
const expected = JSON.parse(fs.readFileSync(expectedPath, 'utf8').trim().split('\n')[0]);
const budget = expected.settings.max_new_tokens;
const failures = [];

async function explainOnPage(webgpu, screenshot) {
  const browser = await launch(webgpu);
  try {
    const tab = await browser.newPage({ viewport: { width: 900, height: 800 } });
    tab.on('console', (m) => console.log(`[page] ${m.text()}`));
    await tab.goto(new URL(page, base).href);
    await tab.waitForSelector('av-explain[condition="cross-washout"]');
    const streamed = [];
    await tab.exposeFunction('avbStreamed', (text) => streamed.push(text));
    const result = await tab.evaluate(
      (tokens) =>
        new Promise((ok) => {
          const widget = document.querySelector('av-explain[condition="cross-washout"]');
          widget.setAttribute('max-tokens', String(tokens));
          new MutationObserver(() => window.avbStreamed(widget.shadowRoot.querySelector('.text').textContent))
            .observe(widget.shadowRoot.querySelector('.text'), { childList: true, characterData: true, subtree: true });
          widget.addEventListener('av-done', (e) => ok({ done: e.detail, stats: widget.shadowRoot.querySelector('.stats').textContent }));
          widget.addEventListener('av-error', (e) => ok({ error: e.detail.message }));
          widget.shadowRoot.querySelector('.go').click();
        }),
      budget,
    );
    await tab.screenshot({ path: path.join(out, screenshot), fullPage: true });
    return { ...result, streamed };
  } finally {
    await browser.close();
  }
}

const gpu = await explainOnPage(true, 'site-webgpu.png');
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
  // Streaming: the text grows through prefixes of the final explanation.
  const prefixes = gpu.streamed.filter((t) => t.length > 0);
  if (prefixes.length < 2 || !prefixes.every((t, i) => i === 0 || t.startsWith(prefixes[i - 1].trimEnd()) || gpu.done.explanation === t)) {
    failures.push(`the explanation did not stream (${prefixes.length} updates)`);
  } else {
    console.log(`ok: streamed in ${prefixes.length} updates`);
  }
}

const none = await explainOnPage(false, 'site-no-webgpu.png');
if (none.error?.includes('WebGPU')) console.log(`ok: without WebGPU the widget says: ${none.error}`);
else failures.push(`without WebGPU: expected a clear WebGPU message, got ${JSON.stringify(none)}`);

for (const f of failures) console.log(`FAIL: ${f}`);
process.exit(failures.length ? 1 : 0);
