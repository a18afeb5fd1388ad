// Fast checks of RoomcastClient's logic in Node with a scripted fake WebSocket and fetch
// (no relay, no browser): de-duplication, resume URL, epochs, queue, acks, refusals, backoff.
// The same behaviour is exercised for real in Chromium by e2e.test.mjs.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { RoomcastClient } from '../../src/web/roomcast-client.js';

class FakeSocket extends EventTarget {
  constructor(url, all) {
    super();
    this.url = new URL(url);
    this.readyState = 0;
    this.bufferedAmount = 0;
    this.sent = [];
    this.closedWith = null;
    all.push(this);
  }
  send(data) {
    if (this.readyState !== 1) throw new Error('InvalidStateError: send while not OPEN');
    this.sent.push(JSON.parse(data));
  }
  close(code = 1000, reason = '') {
    if (this.readyState >= 2) return;
    this.closedWith = code;
    this.readyState = 3;
    queueMicrotask(() => this.fire('close', { code, reason }));
  }
  fire(type, props = {}) { this.dispatchEvent(Object.assign(new Event(type), props)); }
  // The "relay" side:
  accept() { this.readyState = 1; this.fire('open'); }
  push(obj) { this.fire('message', { data: JSON.stringify(obj) }); }
  drop(code = 1006) { this.readyState = 3; this.fire('close', { code, reason: '' }); }
}

function setup(options = {}, { probeStatus = 426 } = {}) {
  const sockets = [];
  const probes = [];
  const client = new RoomcastClient({
    url: 'http://relay.test:8080/',
    room: 'r', name: 'ann', token: 't',
    baseDelayMs: 5, maxDelayMs: 40, stableAfterMs: 10_000, rateLimitPauseMs: 5,
    WebSocket: class extends FakeSocket { constructor(url) { super(url, sockets); } },
    fetch: async (url, init) => {
      probes.push({ url, method: init.method });
      if (probeStatus instanceof Error) throw probeStatus;
      return { status: typeof probeStatus === 'function' ? probeStatus(init.method) : probeStatus };
    },
    ...options,
  });
  const events = [];
  for (const type of ['status', 'history', 'message', 'presence', 'ack', 'error', 'notice', 'refused', 'queue']) {
    client.on(type, (detail) => events.push({ type, ...detail }));
  }
  const of = (type) => events.filter((e) => e.type === type);
  const messages = () => events
    .flatMap((e) => (e.type === 'history' ? e.messages : e.type === 'message' ? [e.message] : []))
    .map((m) => m.text);
  return { client, sockets, probes, events, of, messages, last: () => sockets.at(-1) };
}

async function until(cond, what, timeoutMs = 2_000) {
  const end = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 2));
  }
}

const msg = (seq, text = `m${seq}`, id = `id-${text}`) => ({ id, room: 'r', from: 'bob', text, sentAt: '2026-01-01T00:00:00Z', seq });

test('resume: since/epoch in the URL, nothing emitted twice, epoch change warns and restarts seq', async () => {
  const h = setup();
  h.client.connect();
  const s1 = h.last();
  assert.equal(s1.url.searchParams.get('since'), null, 'first connect asks for the normal history');
  s1.accept();
  s1.push({ type: 'history', room: 'r', epoch: 'e1', messages: [msg(1), msg(2)], complete: true });
  s1.push({ type: 'message', message: msg(2) }); // duplicate: dropped
  s1.push({ type: 'message', message: msg(3) });
  assert.deepEqual(h.messages(), ['m1', 'm2', 'm3']);

  s1.drop(1006);
  await until(() => h.sockets.length === 2, 'reconnect');
  const s2 = h.last();
  assert.equal(s2.url.searchParams.get('since'), '3');
  assert.equal(s2.url.searchParams.get('epoch'), 'e1');
  s2.accept();
  s2.push({ type: 'history', room: 'r', epoch: 'e1', messages: [msg(3), msg(4)], complete: true });
  assert.deepEqual(h.messages(), ['m1', 'm2', 'm3', 'm4']);
  assert.equal(h.of('notice').length, 0);

  s2.drop(1001);
  await until(() => h.sockets.length === 3, 'reconnect after 1001');
  const s3 = h.last();
  assert.equal(s3.url.searchParams.get('since'), '4');
  s3.accept();
  s3.push({ type: 'history', room: 'r', epoch: 'e2', messages: [msg(1, 'new1')], complete: false });
  s3.push({ type: 'message', message: msg(2, 'new2') });
  assert.deepEqual(h.messages(), ['m1', 'm2', 'm3', 'm4', 'new1', 'new2']);
  const [notice] = h.of('notice');
  assert.equal(notice.kind, 'history_incomplete');
  assert.equal(notice.epochChanged, true);
  assert.deepEqual(h.client.resumeState(), { epoch: 'e2', lastSeq: 2 });
  h.client.disconnect();
});

test('the session from the greeting is given back on every reconnect', async () => {
  const h = setup();
  h.client.connect();
  const s1 = h.last();
  assert.equal(s1.url.searchParams.get('session'), null, 'no session before the relay issues one');
  s1.accept();
  const session = '0123456789abcdef0123456789abcdef';
  s1.push({ type: 'system', message: 'connected as ann', clientId: 1, session });
  assert.equal(h.client.session, session);
  const id = h.client.send('hello');
  s1.drop(1006);
  await until(() => h.sockets.length === 2, 'reconnect');
  const s2 = h.last();
  assert.equal(s2.url.searchParams.get('session'), session);
  s2.accept();
  assert.equal(s2.sent[0].requestId, id, 'the resend keeps its requestId under the same session');
  // A greeting without a usable session keeps the one we have.
  s2.push({ type: 'system', message: 'connected as ann', clientId: 2, session: 'NOT-HEX' });
  assert.equal(h.client.session, session);
  h.client.disconnect();
});

test('a conflict error drops the message (it would conflict again)', async () => {
  const h = setup();
  h.client.connect();
  h.last().accept();
  h.client.send('text');
  await until(() => h.last().sent.length === 1, 'send');
  h.last().push({ type: 'error', code: 'conflict', message: 'requestId reused' });
  assert.equal(h.client.queued, 0);
  assert.equal(h.of('error').at(-1).willRetry, false);
  h.client.disconnect();
});

test('complete:false without an epoch change still warns; a live gap warns', () => {
  const h = setup();
  h.client.connect();
  h.last().accept();
  h.last().push({ type: 'history', room: 'r', epoch: 'e1', messages: [msg(7)], complete: false });
  assert.deepEqual(h.of('notice').map((n) => n.kind), ['history_incomplete']);
  h.last().push({ type: 'message', message: msg(9) });
  assert.deepEqual(h.of('notice').map((n) => n.kind), ['history_incomplete', 'gap']);
  h.client.disconnect();
});

test('sending waits for OPEN, carries a requestId, is resent with the same id until acked', async () => {
  const h = setup();
  h.client.connect();
  const id = h.client.send('hello');
  assert.equal(h.client.queued, 1);
  const s1 = h.last();
  assert.equal(s1.sent.length, 0, 'nothing sent while CONNECTING');
  s1.accept();
  assert.deepEqual(s1.sent, [{ type: 'message', text: 'hello', requestId: id }]);
  s1.drop(1006); // lost before the ack
  await until(() => h.sockets.length === 2, 'reconnect');
  const s2 = h.last();
  s2.accept();
  assert.deepEqual(s2.sent, [{ type: 'message', text: 'hello', requestId: id }], 'same requestId');
  s2.push({ type: 'ack', requestId: id, id: 'x', seq: 1, duplicate: true });
  assert.equal(h.client.queued, 0);
  assert.equal(h.of('ack')[0].duplicate, true);
  h.client.disconnect();
});

test('bufferedAmount over the threshold holds messages back', async () => {
  const h = setup({ maxBufferedBytes: 100 });
  h.client.connect();
  const s = h.last();
  s.accept();
  s.bufferedAmount = 500;
  h.client.send('held');
  assert.equal(s.sent.length, 0);
  s.bufferedAmount = 0;
  await until(() => s.sent.length === 1, 'flush after the buffer drained');
  h.client.disconnect();
});

test('the queue is bounded: the oldest waiting message is dropped with a notice', () => {
  const h = setup({ maxQueue: 3 });
  for (const t of ['a', 'b', 'c', 'd', 'e']) h.client.send(t);
  assert.equal(h.client.queued, 3);
  assert.deepEqual(h.of('notice').map((n) => [n.kind, n.text]), [['queue_dropped', 'a'], ['queue_dropped', 'b']]);
});

test('frames the relay would answer with 1009 are refused locally', () => {
  const h = setup();
  assert.equal(h.client.send('€'.repeat(700)), null);
  assert.equal(h.client.queued, 0);
  assert.equal(h.of('error')[0].code, 'too_large');
});

test('errors belong to the oldest message in flight; rate_limited is retried, too_large dropped', async () => {
  const h = setup();
  h.client.connect();
  const s = h.last();
  s.accept();
  const a = h.client.send('a');
  h.client.send('b');
  h.client.send('c');
  assert.equal(s.sent.length, 3);
  s.push({ type: 'ack', requestId: a, id: 'ia', seq: 1 });
  s.push({ type: 'error', code: 'too_large', message: 'too long' });
  s.push({ type: 'error', code: 'rate_limited', message: 'slow down' });
  const errors = h.of('error');
  assert.deepEqual(errors.map((e) => [e.code, e.text, e.willRetry]), [['too_large', 'b', false], ['rate_limited', 'c', true]]);
  assert.equal(h.client.queued, 1);
  await until(() => s.sent.length === 4, 'retry after the pause');
  assert.equal(s.sent[3].text, 'c');
  assert.equal(s.sent[3].requestId, s.sent[2].requestId);
  h.client.disconnect();
});

test('a refused upgrade (probe 401/403) stops for good and says why', async () => {
  for (const status of [401, 403]) {
    const h = setup({}, { probeStatus: status });
    h.client.connect();
    h.last().drop(1006); // never opened
    await until(() => h.client.state === 'stopped', `stopped after ${status}`);
    assert.equal(h.of('refused')[0].status, status);
    assert.deepEqual(h.probes.map((p) => p.method), ['GET']);
    const probe = new URL(h.probes[0].url);
    assert.equal(probe.protocol, 'http:');
    assert.equal(probe.pathname, '/chat');
    assert.equal(probe.searchParams.get('token'), 't');
    await new Promise((r) => setTimeout(r, 100));
    assert.equal(h.sockets.length, 1, 'no further attempts');
  }
});

test('a GET answering 426 is followed by a POST (which carries Origin); its 403 is an origin refusal', async () => {
  const h = setup({}, { probeStatus: (method) => (method === 'GET' ? 426 : 403) });
  h.client.connect();
  h.last().drop(1006);
  await until(() => h.client.state === 'stopped', 'stopped');
  assert.deepEqual(h.probes.map((p) => p.method), ['GET', 'POST']);
  assert.equal(h.of('refused')[0].reason, 'forbidden_origin');
});

test('426 (credentials fine), 503 and an unreachable relay keep retrying', async () => {
  for (const probeStatus of [426, 503, new TypeError('fetch failed')]) {
    const h = setup({}, { probeStatus });
    h.client.connect();
    h.last().drop(1006);
    await until(() => h.sockets.length === 2, `retry after ${probeStatus}`);
    assert.equal(h.of('refused').length, 0);
    h.client.disconnect();
  }
});

test('close 1008 stops; a deliberate disconnect does not reconnect', async () => {
  const h = setup();
  h.client.connect();
  h.last().accept();
  h.last().drop(1008);
  assert.equal(h.client.state, 'stopped');
  const h2 = setup();
  h2.client.connect();
  h2.last().accept();
  h2.client.disconnect();
  await new Promise((r) => setTimeout(r, 80));
  assert.equal(h.sockets.length, 1);
  assert.equal(h2.sockets.length, 1);
  assert.equal(h2.client.state, 'closed');
});

test('backoff: full jitter under a doubling ceiling with a cap; 1013 waits longer', async () => {
  const rolls = [0.5, 1, 0.25, 1, 1, 0];
  const h = setup({ random: () => rolls.shift() ?? 0 }, { probeStatus: new TypeError('down') });
  h.client.connect();
  for (let i = 0; i < 6; i++) {
    h.last().drop(1006);
    await until(() => h.sockets.length === i + 2, `attempt ${i + 2}`);
  }
  const delays = h.of('status').filter((e) => e.state === 'reconnecting').map((e) => e.delayMs);
  // ceilings 5, 10, 20, 40 (cap), 40, 40 ms
  assert.deepEqual(delays, [3, 10, 5, 40, 40, 0]);
  h.client.disconnect();

  const slow = setup({ random: () => 0, slowFloorMs: 30 });
  slow.client.connect();
  slow.last().accept();
  slow.last().drop(1013);
  const [reconnecting] = slow.of('status').filter((e) => e.state === 'reconnecting');
  assert.equal(reconnecting.delayMs, 30);
  slow.client.disconnect();
});
