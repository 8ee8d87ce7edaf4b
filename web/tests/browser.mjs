// Debian's Chromium for the browser tests, with the flags of shared/docs/webgpu-ci.md: WebGPU on SwiftShader, or
// (webgpu = false) no --enable-unsafe-webgpu, which leaves the page without a GPU adapter.
import { chromium } from 'playwright-core';

export async function launch(webgpu) {
  const args = ['--no-sandbox', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--disable-quic'];
  if (webgpu) args.push('--enable-unsafe-webgpu', '--enable-features=Vulkan', '--use-vulkan=swiftshader', '--use-angle=swiftshader');
  return chromium.launch({ executablePath: process.env.AVB_CHROMIUM ?? '/usr/bin/chromium', headless: true, args });
}
