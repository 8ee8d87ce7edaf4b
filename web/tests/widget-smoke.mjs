// The demo feature page in Chromium (WebGPU on SwiftShader): click the cross+washout widget's Explain with a
// 4-token budget and check that an explanation arrives as text. ROOT must hold pkg/, web/ and web/demo/'s inputs
// (feature.json, bundle/, map.safetensors, washout.safetensors; web/tests/run-e2e.sh sets them up).
//   node web/tests/widget-smoke.mjs ROOT SCREENSHOT
import { serve, launch } from './serve.mjs';

const [root, screenshot] = process.argv.slice(2);
const { server, port } = await serve(root);
const browser = await launch(true);
let failed = true;
try {
  const page = await browser.newPage({ viewport: { width: 900, height: 700 } });
  await page.goto(`http://127.0.0.1:${port}/web/demo/index.html`);
  await page.waitForSelector('av-explain');
  const result = await page.evaluate(
    () =>
      new Promise((ok) => {
        const widget = document.querySelectorAll('av-explain')[1];
        widget.setAttribute('max-tokens', '4');
        widget.addEventListener('av-done', (e) => ok({ done: e.detail }));
        widget.addEventListener('av-error', (e) => ok({ error: e.detail.message }));
        widget.shadowRoot.querySelector('.go').click();
      }),
  );
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(JSON.stringify(result));
  failed = !(result.done && result.done.tokens === 4 && result.done.raw.length > 0);
  console.log(failed ? 'FAIL: no explanation' : `ok: the widget wrote "${result.done.raw}"`);
} finally {
  await browser.close();
  server.close();
}
process.exit(failed ? 1 : 0);
