// Browser-side helpers: launch Debian's Chromium, open the chat page, type, read the log.
import { execFileSync } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
export const ARTIFACTS = path.join(here, 'artifacts');

export const CHROMIUM = process.env.CHROMIUM_BIN ?? '/usr/bin/chromium';

export function launchBrowser() {
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    timeout: 30_000,
    args: [
      '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
  });
}

/**
 * Opens the page served by the relay in a fresh browser context (its own "device", so it can be
 * taken offline alone), fills the form and presses Connect. Resolves once the status says open,
 * unless `expectOpen` is false.
 */
export async function openChat(browser, relay, { room, name, token = 'dev-token', expectOpen = true }) {
  const context = await browser.newContext({ viewport: { width: 820, height: 760 } });
  const page = await context.newPage();
  page.setDefaultTimeout(10_000);
  const tab = { context, page, name, room, sockets: [], pageErrors: [] };
  page.on('pageerror', (err) => tab.pageErrors.push(err));
  page.on('websocket', (ws) => tab.sockets.push({ url: ws.url(), at: Date.now() }));
  await page.goto(`${relay.origin}/`, { timeout: 10_000 });
  await page.getByLabel('Room', { exact: true }).fill(room);
  await page.getByLabel('Name', { exact: true }).fill(name);
  await page.getByLabel('Token', { exact: true }).fill(token);
  await page.getByRole('button', { name: 'Connect', exact: true }).click();
  if (expectOpen) await waitState(page, 'open');
  return tab;
}

export async function waitState(page, state, timeout = 10_000) {
  await page.locator(`#status[data-state="${state}"]`).waitFor({ timeout });
}

/** Types a message and presses Enter, like a person. */
export async function say(page, text) {
  const box = page.getByLabel('Message', { exact: true });
  await box.fill(text);
  await box.press('Enter');
}

/** The texts of all chat messages in the log, in order. */
export function texts(page) {
  return page.$$eval('#log li.msg .text', (els) => els.map((e) => e.textContent));
}

export async function count(page, text) {
  return (await texts(page)).filter((t) => t === text).length;
}

/** Waits until the log shows `text` (as a chat message) at least once. */
export async function waitForText(page, text, timeout = 10_000) {
  await page.waitForFunction(
    (t) => [...document.querySelectorAll('#log li.msg .text')].some((e) => e.textContent === t),
    text,
    { timeout },
  );
}

export async function waitForNotice(page, kind, timeout = 10_000) {
  const notice = page.locator(`#log li.notice[data-kind="${kind}"]`).first();
  await notice.waitFor({ timeout });
  return notice.textContent();
}

export function noticeCount(page, kind) {
  return page.locator(`#log li.notice[data-kind="${kind}"]`).count();
}

export const statusText = (page) => page.locator('#status').textContent();

/** The client's event trail (see app.js), e.g. status changes with their backoff delays. */
export function trail(page) {
  return page.evaluate(() => window.roomcast.trail);
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ---- real connection loss ------------------------------------------------------------------

/** Local ports of the established TCP connections from this machine to `port`. */
export function clientPorts(port) {
  const out = execFileSync('ss', ['-tnH', 'state', 'established', `( dport = :${port} )`], { encoding: 'utf8', timeout: 5_000 });
  return new Set(out.split('\n').filter(Boolean).map((line) => line.trim().split(/\s+/)[2]?.split(':').pop()));
}

/**
 * Destroys TCP connections (both ends see them die, like a network failure) with `ss -K`.
 * Needs CAP_NET_ADMIN and a kernel with INET_DIAG_DESTROY; returns how many were killed.
 */
export function killConnections(port, localPorts) {
  let killed = 0;
  for (const lp of localPorts) {
    const out = execFileSync('ss', ['-K', '-tnH', 'state', 'established', `( dport = :${port} and sport = :${lp} )`], { encoding: 'utf8', timeout: 5_000 });
    killed += out.split('\n').filter(Boolean).length;
  }
  return killed;
}

// ---- artifacts -----------------------------------------------------------------------------

/** Saves both tabs side by side as one PNG (plus one per tab) under artifacts/. */
export async function saveConversationScreenshot(browser, tabs, file) {
  mkdirSync(ARTIFACTS, { recursive: true });
  const shots = [];
  for (const tab of tabs) {
    const png = await tab.page.screenshot({ fullPage: true });
    writeFileSync(path.join(ARTIFACTS, `${path.basename(file, '.png')}-${tab.name}.png`), png);
    shots.push({ name: tab.name, data: png.toString('base64') });
  }
  const page = await browser.newPage({ viewport: { width: 1700, height: 900 } });
  try {
    await page.setContent(`<body style="margin:0;display:flex;gap:12px;padding:12px;background:#888;font:14px sans-serif">${
      shots.map((s) => `<figure style="margin:0"><figcaption style="color:#fff">tab: ${s.name}</figcaption><img src="data:image/png;base64,${s.data}"></figure>`).join('')
    }</body>`);
    await page.screenshot({ path: path.join(ARTIFACTS, file), fullPage: true });
  } finally {
    await page.close();
  }
  return path.join(ARTIFACTS, file);
}
