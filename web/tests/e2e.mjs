// Browser end-to-end check: serve a directory holding pkg/, web/ and a bundle on 127.0.0.1, open the test page in
// Debian's Chromium (WebGPU on SwiftShader, flags from shared/docs/webgpu-ci.md), and compare the streamed greedy
// tokens with the native CLI's on the same bundle.
//   node web/tests/e2e.mjs ROOT BUNDLE_PATH EXPECTED_JSON SCREENSHOT [--no-webgpu]
import fs from 'node:fs';
import { serve, launch } from './serve.mjs';

const [root, bundle, expectedPath, screenshot] = process.argv.slice(2);
const noWebGpu = process.argv.includes('--no-webgpu');
const { server, port } = await serve(root);
const browser = await launch(!noWebGpu);
let failed = false;
try {
  const page = await browser.newPage();
  page.on('console', (m) => console.log(`[page] ${m.text()}`));
  const expected = JSON.parse(fs.readFileSync(expectedPath, 'utf8'));
  const url = `http://127.0.0.1:${port}/web/tests/generate.html?bundle=/${bundle}/&n=${expected.ids.length}&prompt=${encodeURIComponent(expected.prompt)}`;
  await page.goto(url);
  await page.waitForFunction(() => document.title === 'done' || document.title === 'error', null, { timeout: 20 * 60 * 1000, polling: 500 });
  const result = JSON.parse(await page.textContent('#result'));
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(await page.textContent('#log'));
  console.log(JSON.stringify(result));
  if (noWebGpu) {
    failed = !(result.error && result.error.includes('WebGPU'));
    console.log(failed ? 'FAIL: expected a clear no-WebGPU message' : `ok: no-WebGPU message: ${result.error}`);
  } else if (result.error) {
    failed = true;
    console.log(`FAIL: ${result.error}`);
  } else {
    const same = result.ids.length === expected.ids.length && result.ids.every((id, i) => id === expected.ids[i]);
    failed = !same;
    console.log(same ? `ok: ${result.ids.length} greedy tokens equal the native CLI's` : `FAIL: browser ${result.ids} vs native ${expected.ids}`);
  }
} finally {
  await browser.close();
  server.close();
}
process.exit(failed ? 1 : 0);
