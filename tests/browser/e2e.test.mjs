// End-to-end tests of the chat page in real Chromium against a real relay (issue 4).
// Run from tests/browser: `node --test` (or ./run.sh, which installs what is missing first).
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import path from 'node:path';
import {
  ARTIFACTS, clientPorts, count, killConnections, launchBrowser, noticeCount, openChat, saveConversationScreenshot,
  say, sleep, statusText, texts, trail, waitForNotice, waitForText, waitState,
} from './chat.mjs';
import { metricValue, startRelay } from './relay.mjs';

let browser;
before(async () => { browser = await launchBrowser(); });
after(async () => { await browser?.close(); });

/**
 * One scenario: relays and tabs it opens are always closed afterwards, pass or fail; on failure
 * the relay's log and the tabs' client trails are printed to help whoever reads the report.
 */
function scenario(name, fn, { timeout = 120_000 } = {}) {
  test(name, { timeout }, async (t) => {
    const relays = [];
    const tabs = [];
    const s = {
      t,
      async relay(opts) { const r = await startRelay(opts); relays.push(r); return r; },
      async tab(relay, opts) { const tab = await openChat(browser, relay, opts); tabs.push(tab); return tab; },
    };
    try {
      await fn(s);
      for (const tab of tabs) assert.deepEqual(tab.pageErrors.map(String), [], `uncaught errors in ${tab.name}'s page`);
    } catch (err) {
      for (const r of relays) t.diagnostic(`relay :${r.port} log (tail):\n${r.logs().slice(-4000)}`);
      for (const tab of tabs) {
        const tr = await Promise.race([trail(tab.page).catch(() => null), sleep(2_000)]);
        t.diagnostic(`${tab.name}: status=${JSON.stringify(await statusText(tab.page).catch(() => '?'))} sockets=${JSON.stringify(tab.sockets)}\ntrail=${JSON.stringify(tr)?.slice(-4000)}`);
      }
      throw err;
    } finally {
      // Each tab's final state, for a person to look at (artifacts/ is not committed).
      const slug = name.split('.')[0];
      await Promise.all(tabs.map((tab) => Promise.race([
        tab.page.screenshot({ path: path.join(ARTIFACTS, `scenario-${slug}-${tab.name}.png`), fullPage: true }).catch(() => {}),
        sleep(5_000),
      ])));
      await Promise.all(tabs.map((tab) => Promise.race([tab.context.close().catch(() => {}), sleep(5_000)])));
      await Promise.all(relays.map((r) => r.kill()));
    }
  });
}

/** Asserts every given text appears exactly once as a chat message in each tab. */
async function assertOnce(tabs, list) {
  for (const tab of tabs) {
    const shown = await texts(tab.page);
    for (const text of list) {
      assert.equal(shown.filter((x) => x === text).length, 1, `${tab.name} should show ${JSON.stringify(text)} exactly once; log: ${JSON.stringify(shown)}`);
    }
  }
}

scenario('1. two tabs in a room chat both ways; a tab in another room sees none of it', async (s) => {
  const relay = await s.relay();
  const alice = await s.tab(relay, { room: 'alpha', name: 'alice' });
  const bob = await s.tab(relay, { room: 'alpha', name: 'bob' });
  const carol = await s.tab(relay, { room: 'beta', name: 'carol' });

  await say(alice.page, 'hello bob, alice here');
  await waitForText(bob.page, 'hello bob, alice here');
  await waitForText(alice.page, 'hello bob, alice here');
  await say(bob.page, 'hi alice! bob answering');
  await waitForText(alice.page, 'hi alice! bob answering');
  await waitForText(bob.page, 'hi alice! bob answering');

  // Carol's connection works (she sees her own message), yet nothing from room alpha reaches her.
  await say(carol.page, 'only beta hears this');
  await waitForText(carol.page, 'only beta hears this');
  await sleep(500);
  assert.deepEqual(await texts(carol.page), ['only beta hears this']);
  for (const tab of [alice, bob]) assert.equal(await count(tab.page, 'only beta hears this'), 0);
  await assertOnce([alice, bob], ['hello bob, alice here', 'hi alice! bob answering']);

  // Presence: two online in alpha, one in beta; sender names come from the relay.
  await alice.page.locator('#online', { hasText: /^2$/ }).waitFor({ timeout: 5_000 });
  await bob.page.locator('#online', { hasText: /^2$/ }).waitFor({ timeout: 5_000 });
  assert.equal(await carol.page.locator('#online').textContent(), '1');
  const froms = await bob.page.$$eval('#log li.msg .from', (els) => els.map((e) => e.textContent));
  assert.deepEqual(froms, ['alice', 'bob']);

  const file = await saveConversationScreenshot(browser, [alice, bob], 'two-tab-conversation.png');
  s.t.diagnostic(`screenshot: ${file}`);
});

scenario('2. a late joiner sees the history; HTML in a message is shown as text', async (s) => {
  const relay = await s.relay();
  const alice = await s.tab(relay, { room: 'history', name: 'alice' });
  const evil = '<img src=x onerror="window.__pwned = 1; document.title = \'pwned\'">';
  const sent = ['first message', evil, '<b>not bold</b> & "quoted"', 'last before dave'];
  for (const text of sent) {
    await say(alice.page, text);
    await waitForText(alice.page, text);
  }

  const dave = await s.tab(relay, { room: 'history', name: 'dave' });
  await waitForText(dave.page, 'last before dave');
  assert.deepEqual(await texts(dave.page), sent, 'history, oldest first, each once');
  for (const tab of [alice, dave]) {
    assert.equal(await tab.page.locator('#log img, #log b').count(), 0, 'no element was created from message text');
    assert.equal(await tab.page.evaluate(() => window.__pwned), undefined, 'no script ran');
    assert.notEqual(await tab.page.title(), 'pwned');
    assert.equal(await tab.page.locator('#log li.msg .text').nth(1).textContent(), evil);
  }
});

scenario('3. a tab that loses its connection catches up exactly once and delivers what was typed offline', async (s) => {
  const relay = await s.relay();
  const alice = await s.tab(relay, { room: 'net', name: 'alice' });
  const before = clientPorts(relay.port);
  const bob = await s.tab(relay, { room: 'net', name: 'bob' });
  const bobPorts = [...clientPorts(relay.port)].filter((p) => !before.has(p));
  assert.ok(bobPorts.length >= 1, 'found the TCP connection(s) of bob\'s tab');

  await say(alice.page, 'before the cut');
  await waitForText(bob.page, 'before the cut');

  // Bob's network goes away: new connections fail, and his live TCP connection is destroyed
  // (both ends see it die, as when a cable is pulled). The relay stays up.
  await bob.context.setOffline(true);
  await sleep(300);
  if (await bob.page.locator('#status').getAttribute('data-state') === 'open') {
    // Offline emulation does not touch an open WebSocket in Chromium: cut it for real.
    let killed = 0;
    try {
      killed = killConnections(relay.port, bobPorts);
    } catch (err) {
      s.t.diagnostic(`ss -K failed: ${err.message}`);
    }
    if (killed === 0) {
      // No right to destroy sockets here (ss -K needs root or CAP_NET_ADMIN): close bob's socket
      // from inside the page instead, as a non-deliberate close the client must recover from.
      s.t.diagnostic('could not destroy the TCP connection; closing the socket from the page instead');
      await bob.page.evaluate(() => window.roomcast.client.socket.close(4000, 'test: network lost'));
    }
  } else {
    s.t.diagnostic('offline emulation closed the WebSocket by itself');
  }
  await waitForNotice(bob.page, 'outage', 5_000);
  assert.notEqual(await bob.page.locator('#status').getAttribute('data-state'), 'open');

  // Alice keeps chatting; bob types while offline (queued, not sent).
  const missed = ['missed one', 'missed two', 'missed three'];
  for (const text of missed) {
    await say(alice.page, text);
    await waitForText(alice.page, text);
  }
  const typed = ['typed offline one', 'typed offline two'];
  for (const text of typed) await say(bob.page, text);
  assert.equal(await bob.page.locator('#queued').textContent(), '2', 'both messages wait in the queue');
  await sleep(1_500);
  assert.equal(await count(alice.page, typed[0]), 0, 'nothing typed offline got through while offline');
  assert.notEqual(await bob.page.locator('#status').getAttribute('data-state'), 'open');

  // Back online: bob reconnects by himself, resuming with since= and epoch=.
  await bob.context.setOffline(false);
  await waitState(bob.page, 'open', 20_000);
  for (const text of [...missed, ...typed]) await waitForText(bob.page, text);
  for (const text of typed) await waitForText(alice.page, text);
  await bob.page.locator('#queued', { hasText: /^0$/ }).waitFor({ timeout: 5_000 });
  await sleep(1_000); // a duplicate would arrive now
  await assertOnce([alice, bob], ['before the cut', ...missed, ...typed]);
  const resumeUrl = new URL(bob.sockets.at(-1).url);
  assert.ok(resumeUrl.searchParams.has('since') && resumeUrl.searchParams.has('epoch'), `resumed with since/epoch: ${resumeUrl.search.replace(/token=[^&]*/, 'token=…')}`);
  const lastHistory = (await trail(bob.page)).filter((e) => e.type === 'history').at(-1);
  assert.equal(lastHistory.complete, true, 'the relay still had everything bob missed');

  // The connection dies after a message left but before its ack came back: the resend after the
  // reconnect carries the same requestId, the relay acknowledges it as a duplicate, and the
  // message is shown exactly once everywhere (bob gets it through the resumed history).
  const socketsBefore = bob.sockets.length;
  const requestId = await bob.page.evaluate(() => {
    const { client } = window.roomcast;
    const id = client.send('sent just before the drop');
    client.socket.close(4001, 'test: connection lost before the ack');
    return id;
  });
  await waitForText(alice.page, 'sent just before the drop');
  await waitForText(bob.page, 'sent just before the drop', 20_000);
  await waitState(bob.page, 'open', 20_000);
  assert.ok(bob.sockets.length > socketsBefore, 'bob reconnected');
  await bob.page.waitForFunction((id) => window.roomcast.trail.some((e) => e.type === 'ack' && e.requestId === id), requestId, { timeout: 10_000 });
  const ack = (await trail(bob.page)).find((e) => e.type === 'ack' && e.requestId === requestId);
  assert.equal(ack.duplicate, true, 'the resend was recognised as a duplicate by the relay');
  await sleep(1_000);
  await assertOnce([alice, bob], ['sent just before the drop']);
});

scenario('4. relay restart: both tabs show the outage, reconnect with jittered backoff, warn about lost history', async (s) => {
  const relay = await s.relay();
  const alice = await s.tab(relay, { room: 'restart', name: 'alice' });
  const bob = await s.tab(relay, { room: 'restart', name: 'bob' });
  await say(alice.page, 'before the restart');
  await waitForText(bob.page, 'before the restart');

  const stoppedAt = Date.now();
  const exit = await relay.stop();
  assert.deepEqual(exit, { code: 0, signal: null }, 'the relay exits 0 on SIGTERM');
  for (const tab of [alice, bob]) {
    await waitForNotice(tab.page, 'outage', 5_000);
    assert.match(await statusText(tab.page), /Reconnecting|Connecting/);
  }
  await sleep(2_500); // down for a while: reconnect attempts fail and back off

  const relay2 = await s.relay({ port: relay.port });
  for (const tab of [alice, bob]) {
    await waitState(tab.page, 'open', 25_000);
    const notice = await waitForNotice(tab.page, 'history_incomplete', 5_000);
    assert.match(notice, /incomplete/i);
  }
  assert.ok(relay2.running);

  await say(alice.page, 'after the restart from alice');
  await say(bob.page, 'after the restart from bob');
  for (const tab of [alice, bob]) {
    await waitForText(tab.page, 'after the restart from alice');
    await waitForText(tab.page, 'after the restart from bob');
  }
  await sleep(1_000);
  await assertOnce([alice, bob], ['before the restart', 'after the restart from alice', 'after the restart from bob']);

  const delays = {};
  for (const tab of [alice, bob]) {
    const events = (await trail(tab.page)).filter((e) => e.at >= stoppedAt);
    const closes = events.filter((e) => e.type === 'status' && e.state === 'reconnecting');
    assert.equal(closes[0]?.code, 1001, `${tab.name} was told the relay is going away (close 1001)`);
    assert.ok(closes.length >= 2, `${tab.name} retried more than once while the relay was down`);
    for (const e of closes) {
      // After a 503 (the relay refusing while it shuts down) the client waits baseDelayMs more.
      const floor = e.probeStatus === 503 ? 500 : 0;
      const ceiling = Math.min(10_000, floor + 500 * 2 ** (e.attempt - 1));
      assert.ok(e.delayMs >= 0 && e.delayMs <= ceiling, `${tab.name}: delay ${e.delayMs} ms within backoff ceiling ${ceiling} ms (attempt ${e.attempt})`);
    }
    delays[tab.name] = closes.map((e) => e.delayMs);
    const history = events.filter((e) => e.type === 'history').at(-1);
    assert.equal(history.complete, false, `${tab.name}: the relay said complete:false for the new epoch`);
    assert.equal(history.epochChanged, true, `${tab.name}: the epoch changed`);
  }
  assert.notDeepEqual(delays.alice, delays.bob, `jitter: the tabs did not retry in lockstep (${JSON.stringify(delays)})`);
  s.t.diagnostic(`reconnect delays (ms): ${JSON.stringify(delays)}`);
});

scenario('5. rate limit and too-long text show notices; the page stays usable', async (s) => {
  const relay = await s.relay({ env: { RATE_LIMIT: '5', RATE_WINDOW_MS: '2000' } });
  const alice = await s.tab(relay, { room: 'limits', name: 'alice' });
  const bob = await s.tab(relay, { room: 'limits', name: 'bob' });
  // The relay counts in fixed windows; let alice's first window run out so the burst below
  // starts a fresh one and cannot straddle two (which could let it pass unlimited).
  await sleep(2_100);

  // Eight messages entered and submitted at once (as fast as a paste-and-Enter macro), so they
  // all land in one rate window however slow this machine is.
  const burst = Array.from({ length: 8 }, (_, i) => `burst ${i + 1}`);
  await alice.page.evaluate((list) => {
    const box = document.getElementById('text');
    for (const text of list) {
      box.value = text;
      box.form.requestSubmit();
    }
  }, burst);
  const rateNotice = await waitForNotice(alice.page, 'error-rate_limited', 5_000);
  assert.match(rateNotice, /too fast/);
  // The refused messages are retried after a pause, so everything arrives, once, in order.
  await waitForText(bob.page, 'burst 8', 20_000);
  await sleep(500);
  assert.deepEqual(await texts(bob.page), burst);
  await assertOnce([alice], burst);

  const tooLong = 'x'.repeat(501);
  await say(alice.page, tooLong);
  const longNotice = await waitForNotice(alice.page, 'error-too_large', 15_000);
  assert.match(longNotice, /too long/);
  assert.match(longNotice, /Not sent/);

  await say(alice.page, 'still usable after the errors');
  await waitForText(bob.page, 'still usable after the errors', 15_000);
  await waitForText(alice.page, 'still usable after the errors');
  for (const tab of [alice, bob]) assert.equal(await count(tab.page, tooLong), 0);
  assert.equal(await alice.page.locator('#status').getAttribute('data-state'), 'open');
  assert.equal(await alice.page.locator('#queued').textContent(), '0');
  assert.equal(await noticeCount(alice.page, 'outage'), 0, 'errors never cost the connection');
});

scenario('6. a wrong token shows a refusal and stops retrying', async (s) => {
  const relay = await s.relay();
  const mallory = await s.tab(relay, { room: 'lobby', name: 'mallory', token: 'wrong-token', expectOpen: false });
  await waitState(mallory.page, 'stopped', 10_000);
  const notice = await waitForNotice(mallory.page, 'refused', 1_000);
  assert.match(notice, /token/i);
  assert.match(notice, /401/);
  assert.match(await statusText(mallory.page), /token/i);

  const rejected = () => relay.metrics().then((m) => metricValue(m, 'roomcast_upgrade_rejections_total', { reason: 'unauthorized' }));
  const first = await rejected();
  const attempts = mallory.sockets.length;
  assert.ok(first >= 1, `the relay counted the refused upgrade (${first})`);
  assert.ok(attempts >= 1);
  await sleep(4_000);
  assert.equal(await rejected(), first, 'no further attempts reached the relay');
  assert.equal(mallory.sockets.length, attempts, 'the page opened no further WebSockets');
  assert.equal(await mallory.page.locator('#status').getAttribute('data-state'), 'stopped');

  // With the right token the same page connects and works.
  await mallory.page.getByLabel('Token', { exact: true }).fill('dev-token');
  await mallory.page.getByRole('button', { name: 'Connect', exact: true }).click();
  await waitState(mallory.page, 'open');
  await say(mallory.page, 'right token now');
  await waitForText(mallory.page, 'right token now');
});

scenario('7. a page served from an origin the relay does not allow shows a refusal and stops retrying', async (s) => {
  // The relay allows only http://127.0.0.1:PORT (see relay.mjs); the page is opened as localhost.
  const relay = await s.relay();
  const other = { origin: `http://localhost:${relay.port}` };
  const eve = await s.tab(other, { room: 'lobby', name: 'eve', expectOpen: false });
  await waitState(eve.page, 'stopped', 10_000);
  const notice = await waitForNotice(eve.page, 'refused', 1_000);
  assert.match(notice, /origin/i);
  assert.match(notice, /403/);
  const rejected = () => relay.metrics().then((m) => metricValue(m, 'roomcast_upgrade_rejections_total', { reason: 'forbidden_origin' }));
  const first = await rejected();
  assert.ok(first >= 1, `the relay counted the refused upgrade (${first})`);
  const attempts = eve.sockets.length;
  await sleep(3_000);
  assert.equal(await rejected(), first, 'no further attempts reached the relay');
  assert.equal(eve.sockets.length, attempts, 'the page opened no further WebSockets');
});
