// The second dialect's seed client (seed-v2/index.html: GET / upgrade, auth message first, join,
// chat with a requestId) in real Chromium against a real relay. The page is served by a static
// server on an origin of its own, as a deployment's web page would be; the relay allows it.
// Run from tests/browser: `node --test seed-v2.test.mjs` (or ./run.sh).
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import http from 'node:http';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import {
  ARTIFACTS, launchBrowser, openChat, saveConversationScreenshot, sleep, texts as roomcastTexts,
  waitForText as waitForRoomcastText,
} from './chat.mjs';
import { metricValue, startRelay } from './relay.mjs';
import { serveStatic } from './static.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const SEED_DIR = path.join(here, 'seed-v2');
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;

let browser;
before(async () => { browser = await launchBrowser(); });
after(async () => { await browser?.close(); });

/**
 * Opens the seed page from `site` in a fresh browser context, pointed at `relay` by the page's
 * own query (as a demo link would). Every WebSocket the page opens is recorded with the types
 * of the frames it sent, so re-auth and re-join can be checked from outside the page.
 */
async function openSeed(site, relay, { name, room, token = 'dev-token', pingMs, expectJoined = true }) {
  const context = await browser.newContext({ viewport: { width: 700, height: 640 } });
  const page = await context.newPage();
  page.setDefaultTimeout(10_000);
  const tab = { context, page, name, room, sockets: [], pageErrors: [], seed: true };
  page.on('pageerror', (err) => tab.pageErrors.push(err));
  page.on('websocket', (ws) => {
    const socket = { url: ws.url(), at: Date.now(), sent: [], closed: false };
    tab.sockets.push(socket);
    ws.on('framesent', (frame) => {
      try { socket.sent.push(JSON.parse(frame.payload)); } catch { socket.sent.push({ type: '(not JSON)' }); }
    });
    ws.on('close', () => { socket.closed = true; });
  });
  const query = new URLSearchParams({ relay: `ws://127.0.0.1:${relay.port}/`, token });
  if (room) query.set('room', room);
  if (pingMs) query.set('pingMs', String(pingMs));
  await page.goto(`${site.origin}/?${query}`, { timeout: 10_000 });
  if (expectJoined) await seedState(page, 'joined');
  return tab;
}

const seedState = (page, state, timeout = 10_000) => page.locator(`#status[data-state="${state}"]`).waitFor({ timeout });

async function seedSay(page, text) {
  const box = page.getByLabel('Message', { exact: true });
  await box.fill(text);
  await box.press('Enter');
}

/** The chats the seed page shows, in order: [{ user, text, mine }]. */
function seedChats(page) {
  return page.$$eval('#messages li.msg', (els) => els.map((li) => ({
    user: li.querySelector('.user').textContent,
    text: li.querySelector('.text').textContent,
    mine: li.classList.contains('mine'),
  })));
}

async function waitForSeedText(page, text, timeout = 10_000) {
  await page.waitForFunction(
    (t) => [...document.querySelectorAll('#messages li.msg .text')].some((e) => e.textContent === t),
    text,
    { timeout },
  );
}

const seedEvents = (page) => page.evaluate(() => window.seed.events);

/** Asserts every given text is shown exactly once in each seed tab. */
async function assertSeedOnce(tabs, list) {
  for (const tab of tabs) {
    const shown = (await seedChats(tab.page)).map((c) => c.text);
    for (const text of list) {
      assert.equal(shown.filter((x) => x === text).length, 1, `${tab.name} should show ${JSON.stringify(text)} exactly once; shown: ${JSON.stringify(shown)}`);
    }
  }
}

/** Asks the relay for a WebSocket upgrade at / with this Origin; resolves to the HTTP status. */
function upgradeStatus(port, origin) {
  return new Promise((resolve, reject) => {
    const req = http.request({
      host: '127.0.0.1', port, path: '/', agent: false, timeout: 5_000,
      headers: {
        Connection: 'Upgrade', Upgrade: 'websocket', 'Sec-WebSocket-Version': '13',
        'Sec-WebSocket-Key': randomBytes(16).toString('base64'), Origin: origin,
      },
    });
    req.on('upgrade', (res, socket) => { socket.destroy(); resolve(res.statusCode); });
    req.on('response', (res) => { res.resume(); resolve(res.statusCode); });
    req.on('timeout', () => req.destroy(new Error('no answer to the upgrade within 5 s')));
    req.on('error', reject);
    req.end();
  });
}

/**
 * One scenario: the relays, static servers and tabs it opens are always closed afterwards; on
 * failure the relay's log and each tab's sockets and event trail are printed.
 */
function scenario(name, fn, { timeout = 120_000 } = {}) {
  test(name, { timeout }, async (t) => {
    const relays = [];
    const sites = [];
    const tabs = [];
    const s = {
      t,
      async relay(opts) { const r = await startRelay(opts); relays.push(r); return r; },
      async site() { const site = await serveStatic(SEED_DIR); sites.push(site); return site; },
      async seed(site, relay, opts) { const tab = await openSeed(site, relay, opts); tabs.push(tab); return tab; },
      async roomcast(relay, opts) { const tab = await openChat(browser, relay, opts); tabs.push(tab); return tab; },
    };
    try {
      await fn(s);
      for (const tab of tabs) assert.deepEqual(tab.pageErrors.map(String), [], `uncaught errors in ${tab.name}'s page`);
    } catch (err) {
      for (const r of relays) t.diagnostic(`relay :${r.port} log (tail):\n${r.logs().slice(-4000)}`);
      for (const tab of tabs) {
        const events = await Promise.race([
          tab.page.evaluate(() => (window.seed ? window.seed.events : window.roomcast?.trail)).catch(() => null),
          sleep(2_000),
        ]);
        const status = await Promise.race([tab.page.locator('#status').textContent().catch(() => '?'), sleep(2_000)]);
        t.diagnostic(`${tab.name}: status=${JSON.stringify(status)} sockets=${JSON.stringify(tab.sockets)}\nevents=${JSON.stringify(events)?.slice(-4000)}`);
      }
      throw err;
    } finally {
      const slug = name.split('.')[0];
      await Promise.all(tabs.map((tab) => Promise.race([
        tab.page.screenshot({ path: path.join(ARTIFACTS, `seed-v2-scenario-${slug}-${tab.name}.png`), fullPage: true }).catch(() => {}),
        sleep(5_000),
      ])));
      await Promise.all(tabs.map((tab) => Promise.race([tab.context.close().catch(() => {}), sleep(5_000)])));
      await Promise.all(relays.map((r) => r.kill()));
      await Promise.all(sites.map((site) => Promise.race([site.close(), sleep(5_000)])));
    }
  });
}

scenario('1. two seed pages chat in room:demo; a seed page and roomcast\'s own page share room lobby', async (s) => {
  const site = await s.site();
  const relay = await s.relay({ extraOrigins: [site.origin] });
  const a = await s.seed(site, relay, { name: 'seed-a', pingMs: 1_000 });
  const b = await s.seed(site, relay, { name: 'seed-b' });

  await seedSay(a.page, 'hello from seed A');
  await waitForSeedText(b.page, 'hello from seed A');
  await waitForSeedText(a.page, 'hello from seed A');
  await seedSay(b.page, 'seed B answering');
  await waitForSeedText(a.page, 'seed B answering');
  await waitForSeedText(b.page, 'seed B answering');
  await sleep(300); // a duplicate would arrive now
  assert.deepEqual(await seedChats(a.page), [
    { user: 'guest', text: 'hello from seed A', mine: true },
    { user: 'guest', text: 'seed B answering', mine: false },
  ]);
  assert.deepEqual(await seedChats(b.page), [
    { user: 'guest', text: 'hello from seed A', mine: false },
    { user: 'guest', text: 'seed B answering', mine: true },
  ]);

  // What went over the wire: auth first, then the join, then chats each with a fresh UUID.
  const frames = a.sockets[0].sent;
  assert.deepEqual(frames[0], { type: 'auth', token: 'dev-token' });
  assert.deepEqual(frames[1], { type: 'join', roomId: 'room:demo' });
  const chats = frames.filter((f) => f.type === 'chat');
  assert.equal(chats.length, 1);
  assert.equal(chats[0].roomId, 'room:demo');
  assert.match(chats[0].requestId, UUID);
  assert.equal(a.sockets.length, 1, 'one connection, no reconnects');
  // The page pings every second here (pingMs=1000); the relay answers with a pong.
  await a.page.waitForFunction(() => window.seed.lastPong !== null, null, { timeout: 5_000 });
  assert.ok(!Number.isNaN(Date.parse(await a.page.evaluate(() => window.seed.lastPong))), 'pong carries an RFC 3339 sentAt');

  // Cross-dialect: a seed page in room lobby and roomcast's own page (/chat?room=lobby) are in
  // the same room; each sees the other's messages.
  const c = await s.seed(site, relay, { name: 'seed-c', room: 'lobby' });
  const ada = await s.roomcast(relay, { room: 'lobby', name: 'ada' });
  await seedSay(c.page, 'seed C says hi to the lobby');
  await waitForRoomcastText(ada.page, 'seed C says hi to the lobby');
  await waitForSeedText(c.page, 'seed C says hi to the lobby');
  const from = await ada.page.$$eval('#log li.msg .from', (els) => els.map((e) => e.textContent));
  assert.deepEqual(from, ['guest'], 'the first dialect sees the second dialect\'s userId as from');
  await ada.page.getByLabel('Message', { exact: true }).fill('ada answers the seed page');
  await ada.page.getByLabel('Message', { exact: true }).press('Enter');
  await waitForSeedText(c.page, 'ada answers the seed page');
  await waitForRoomcastText(ada.page, 'ada answers the seed page');
  await sleep(300);
  assert.deepEqual(await seedChats(c.page), [
    { user: 'guest', text: 'seed C says hi to the lobby', mine: true },
    { user: 'ada', text: 'ada answers the seed page', mine: false },
  ]);
  assert.deepEqual(await roomcastTexts(ada.page), ['seed C says hi to the lobby', 'ada answers the seed page']);
  for (const tab of [a, b]) {
    assert.equal((await seedChats(tab.page)).length, 2, `${tab.name} (room:demo) saw nothing from lobby`);
  }

  const file = await saveConversationScreenshot(browser, [a, b, c, ada], 'seed-v2-conversation.png');
  s.t.diagnostic(`screenshot: ${file}`);
});

scenario('2. relay restart: the seed pages reconnect with backoff, re-auth, re-join and chat both ways', async (s) => {
  const site = await s.site();
  const relay = await s.relay({ extraOrigins: [site.origin] });
  const a = await s.seed(site, relay, { name: 'seed-a' });
  const b = await s.seed(site, relay, { name: 'seed-b' });
  await seedSay(a.page, 'before the restart');
  await waitForSeedText(b.page, 'before the restart');

  const stoppedAt = Date.now();
  assert.deepEqual(await relay.stop(), { code: 0, signal: null }, 'the relay exits 0 on SIGTERM');
  for (const tab of [a, b]) {
    // The first close is 1001 (checked in the events below); by now a refused retry (1006) may
    // already have replaced it on screen, since the relay drains for a moment before it exits.
    await seedState(tab.page, 'disconnected', 5_000);
    assert.match(await tab.page.locator('#status').textContent(), /disconnected \(code 100[16]\); retrying in \d/);
    assert.equal(await tab.page.locator('#text').isDisabled(), true, 'no typing into a dead socket');
  }
  await sleep(2_500); // down for a while: reconnect attempts are refused and back off

  const relay2 = await s.relay({ port: relay.port, extraOrigins: [site.origin] });
  for (const tab of [a, b]) await seedState(tab.page, 'joined', 25_000);
  assert.ok(relay2.running);

  await seedSay(a.page, 'after the restart from A');
  await seedSay(b.page, 'after the restart from B');
  for (const tab of [a, b]) {
    await waitForSeedText(tab.page, 'after the restart from A');
    await waitForSeedText(tab.page, 'after the restart from B');
  }
  await sleep(500);
  await assertSeedOnce([a, b], ['before the restart', 'after the restart from A', 'after the restart from B']);

  const delays = {};
  for (const tab of [a, b]) {
    const events = (await seedEvents(tab.page)).filter((e) => e.at >= stoppedAt);
    const closes = events.filter((e) => e.type === 'close');
    assert.equal(closes[0]?.code, 1001, `${tab.name} was told the relay is going away (close 1001)`);
    assert.ok(closes.length >= 2, `${tab.name} retried more than once while the relay was down (${closes.length} closes)`);
    const retries = events.filter((e) => e.type === 'retry');
    for (const e of retries) {
      const ceiling = Math.min(8_000, 500 * 2 ** (e.attempt - 1)) * 1.2;
      assert.ok(e.delayMs > 0 && e.delayMs <= ceiling, `${tab.name}: delay ${e.delayMs} ms within ceiling ${ceiling} ms (attempt ${e.attempt})`);
    }
    assert.ok(retries.at(-1).delayMs > retries[0].delayMs, `${tab.name}: the delays grew (${retries.map((e) => e.delayMs)})`);
    delays[tab.name] = retries.map((e) => e.delayMs);
    assert.deepEqual(events.filter((e) => e.type === 'auth_ok' || e.type === 'joined').map((e) => e.type), ['auth_ok', 'joined'], `${tab.name} authenticated and joined once on the new relay`);

    // Seen from outside the page: a new socket that sent auth first and then the join again.
    const last = tab.sockets.at(-1);
    assert.ok(tab.sockets.length >= 3, `${tab.name}: the first socket, refused attempts, the new one (${tab.sockets.length})`);
    assert.deepEqual(last.sent.slice(0, 2), [{ type: 'auth', token: 'dev-token' }, { type: 'join', roomId: 'room:demo' }]);
    assert.equal(last.closed, false);
  }
  s.t.diagnostic(`reconnect delays (ms): ${JSON.stringify(delays)}`);
});

scenario('3. a seed page served from an origin the relay does not allow cannot connect (403)', async (s) => {
  const allowed = await s.site();
  const foreign = await s.site(); // same files, another port: another origin
  const relay = await s.relay({ extraOrigins: [allowed.origin] });
  assert.equal(await upgradeStatus(relay.port, foreign.origin), 403, 'the upgrade from the foreign origin is refused');
  assert.equal(await upgradeStatus(relay.port, allowed.origin), 101, 'the same upgrade from the allowed origin is accepted');
  const forbidden = () => relay.metrics().then((m) => metricValue(m, 'roomcast_upgrade_rejections_total', { reason: 'forbidden_origin' }));
  const before = await forbidden();

  const eve = await s.seed(foreign, relay, { name: 'eve', expectJoined: false });
  await seedState(eve.page, 'disconnected', 10_000);
  assert.match(await eve.page.locator('#status').textContent(), /disconnected \(code 1006\)/);
  await eve.page.waitForFunction(() => window.seed.events.filter((e) => e.type === 'close').length >= 2, null, { timeout: 10_000 });
  const events = await seedEvents(eve.page);
  assert.deepEqual(events.filter((e) => ['open', 'auth_ok', 'joined'].includes(e.type)), [], 'no socket ever opened');
  assert.ok(eve.sockets.every((sock) => sock.sent.length === 0), 'nothing was sent: the token never left the page');
  assert.ok(await forbidden() >= before + 2, 'the relay refused each attempt as forbidden_origin');
  assert.equal(await eve.page.locator('#send').isDisabled(), true);
});

scenario('4. a seed page with a wrong token is closed 4403 and stops retrying', async (s) => {
  const site = await s.site();
  const relay = await s.relay({ extraOrigins: [site.origin] });
  const mallory = await s.seed(site, relay, { name: 'mallory', token: 'wrong-token', expectJoined: false });
  await seedState(mallory.page, 'failed', 10_000);
  assert.match(await mallory.page.locator('#status').textContent(), /authentication failed \(4403 auth failed\)/);
  const badToken = () => relay.metrics().then((m) => metricValue(m, 'roomcast_auth_failures_total', { reason: 'bad_token' }));
  assert.equal(await badToken(), 1);
  await sleep(2_000);
  assert.equal(mallory.sockets.length, 1, 'no further attempts');
  assert.equal(await badToken(), 1);
});
