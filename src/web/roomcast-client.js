// roomcast-client.js — a small, dependency-free client for the roomcast relay.
//
//   import { RoomcastClient } from './roomcast-client.js';
//   const client = new RoomcastClient({ url: location.origin, room: 'lobby', name: 'ada', token: 'dev-token' });
//   client.on('message', ({ message }) => console.log(message.from, message.text));
//   client.on('status', ({ state }) => console.log(state));
//   client.connect();
//   client.send('hello');
//
// What it does for you:
// - Reconnects after any close that was not deliberate, with exponential backoff and full jitter
//   (delay = random(0, min(cap, base * 2^attempt))), reset once a connection stayed open for a while.
//   Close 1013 (too slow) and 1001 (relay going away) back off further; close 1008 stops for good.
// - A browser cannot see why an upgrade was refused (it only gets close 1006), so after a socket
//   that never opened it asks the relay with a plain GET of the same /chat URL: 401 (token) and
//   403 (origin) stop retrying and emit `refused`; 426 (credentials fine) and 503 (full) retry.
//   A same-origin GET carries no Origin header, so after a 426 it asks once more with a POST
//   (which always carries Origin) to tell an origin refusal apart.
// - Resumes exactly: remembers the last `seq` and the `epoch` per room and reconnects with
//   `since=SEQ&epoch=E`; a message is never emitted twice; `complete:false` (or an epoch change)
//   emits a `history_incomplete` notice.
// - Sends only while the socket is OPEN and `bufferedAmount` is below a threshold; otherwise the
//   message waits in a bounded queue (oldest dropped, with a notice). Every message carries a
//   `requestId` and stays queued until the relay acknowledges it, so a resend after a reconnect is
//   never posted twice: the relay de-duplicates by (room, session, requestId), where the session
//   is the one the relay issued in its greeting, which this client keeps and gives back with
//   `session=` on every reconnect.
//
// Events (an EventTarget; each event is a CustomEvent whose `detail` is described below; the
// `on(type, fn)` helper passes the detail directly and returns an unsubscribe function):
//   status   {state, attempt, delayMs?, code?, reason?, probeStatus?}
//            state: 'idle' | 'connecting' | 'open' | 'reconnecting' | 'closed' | 'stopped'
//   system   {message, clientId, session}         the relay's greeting
//   history  {room, epoch, messages, complete, resumed, epochChanged}   messages already de-duplicated
//   message  {message}                            a new chat message {id, room, from, text, sentAt, seq}
//   presence {online, message, joined, left}
//   ack      {requestId, id, seq, duplicate}
//   error    {code, message, text?, willRetry}    an error event from the relay (or a local check)
//   notice   {kind, message, ...}                 kinds: history_incomplete, gap, queue_dropped,
//                                                 origin_suspect
//   refused  {status, reason, message}            the relay refused us; the client stopped
//   queue    {queued}                             number of messages waiting for an ack

const OPEN = 1;

const DEFAULTS = Object.freeze({
  url: undefined, // base URL (http(s) or ws(s)); defaults to the page's location
  path: '/chat',
  room: 'lobby',
  name: '',
  token: '',
  baseDelayMs: 500,
  maxDelayMs: 10_000,
  stableAfterMs: 10_000, // a connection open this long resets the backoff
  slowFloorMs: 1_000, // minimum extra delay after close 1013
  maxQueue: 100, // messages waiting to be sent or acknowledged
  maxBufferedBytes: 64 * 1024,
  maxInFlight: 8, // unacknowledged messages on the wire at once
  maxPayloadBytes: 2048, // frames larger than this make the relay close with 1009
  probeTimeoutMs: 5_000,
  rateLimitPauseMs: 1_000, // first pause after a rate_limited error, doubled up to maxDelayMs
  random: Math.random,
  WebSocket: undefined, // injectable for tests / non-browser use
  fetch: undefined,
});

// Error codes after which the message is dropped (it would fail again) vs. retried later.
// `conflict`: this requestId already carried another text in this session (it would again).
const DROP_CODES = new Set(['too_large', 'bad_json', 'bad_type', 'empty', 'conflict']);

// A session as the relay issues it.
const SESSION = /^[0-9a-f]{32}$/;

const REFUSALS = {
  401: ['unauthorized', 'The relay rejected the token (HTTP 401).'],
  403: ['forbidden_origin', 'The relay does not allow this page’s origin (HTTP 403).'],
  404: ['not_found', 'There is no chat endpoint at this address (HTTP 404).'],
};

const CLOSE_REASONS = {
  1000: 'closed normally',
  1001: 'the relay is going away (restart or shutdown)',
  1002: 'protocol error',
  1003: 'unsupported data',
  1006: 'connection lost',
  1007: 'invalid UTF-8',
  1008: 'closed by the relay for repeated violations',
  1009: 'message too big',
  1011: 'relay error',
  1013: 'this connection was too slow to keep up',
};

export function describeClose(code) {
  return CLOSE_REASONS[code] ?? `closed (code ${code})`;
}

export function newRequestId() {
  const bytes = new Uint8Array(16);
  if (globalThis.crypto?.getRandomValues) globalThis.crypto.getRandomValues(bytes);
  else for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

const utf8Length = (s) => new TextEncoder().encode(s).length;

export class RoomcastClient extends EventTarget {
  constructor(options = {}) {
    super();
    this.options = { ...DEFAULTS, ...options };
    this._ws = null;
    this._state = 'idle';
    this._attempt = 0; // reconnect attempts since the last stable connection
    this._gen = 0; // bumps on every connect/disconnect; stale callbacks compare against it
    this._deliberate = false;
    this._timers = { reconnect: null, stable: null, flush: null };
    this._outbox = []; // [{requestId, room, text, frame, sentOn}] until acked
    this._rooms = new Map(); // room -> {epoch, lastSeq}
    this._session = null; // issued by the relay in its greeting; identifies our requestIds
    this._seen = new Set(); // recent message ids (a second line of defence against duplicates)
    this._seenOrder = [];
    this._online = null;
    this._pausedUntil = 0;
    this._sendCounter = 0;
    this._rateLimitStreak = 0;
    this._rateLimited = false;
    this._acceptedButFailing = 0; // sockets that never opened although the probe said 426
    this._onBrowserOnline = () => {
      // The network came back: do not wait out a long backoff, but keep the jitter.
      if (this._state === 'reconnecting') this._schedule(this.options.random() * this.options.baseDelayMs);
    };
  }

  get state() { return this._state; }
  get room() { return this.options.room; }
  get online() { return this._online; }
  get queued() { return this._outbox.length; }
  /** The session the relay issued (kept across reconnects), or null before the first greeting. */
  get session() { return this._session; }
  /** The current WebSocket, if any (read-only; do not replace its handlers). */
  get socket() { return this._ws; }
  /** Forgets the resume position of a room (the next connect gets its full history). */
  forgetRoom(room = this.options.room) {
    this._rooms.delete(room);
  }

  /** {epoch, lastSeq} remembered for a room, or undefined. */
  resumeState(room = this.options.room) {
    const s = this._rooms.get(room);
    return s ? { ...s } : undefined;
  }

  on(type, fn) {
    const listener = (ev) => fn(ev.detail);
    this.addEventListener(type, listener);
    return () => this.removeEventListener(type, listener);
  }

  /** Connects (or reconnects with new settings: room, name, token, url). */
  connect(settings = {}) {
    for (const key of ['url', 'path', 'room', 'name', 'token']) {
      if (settings[key] !== undefined) this.options[key] = settings[key];
    }
    this._closeSocket(1000, 'reconnecting');
    this._clearTimers();
    this._deliberate = false;
    this._attempt = 0;
    this._acceptedButFailing = 0;
    this._dropOtherRooms();
    globalThis.addEventListener?.('online', this._onBrowserOnline);
    this._open();
  }

  /** Closes deliberately; no reconnect. Queued messages stay queued for the next connect(). */
  disconnect() {
    this._deliberate = true;
    this._gen++;
    this._clearTimers();
    globalThis.removeEventListener?.('online', this._onBrowserOnline);
    this._closeSocket(1000, 'bye');
    this._online = null;
    this._setState('closed', { reason: 'disconnected' });
  }

  /**
   * Queues a message and sends it as soon as possible. Returns its requestId, or null when the
   * message can never be sent (it is reported with an `error` event instead).
   */
  send(text) {
    if (typeof text !== 'string') throw new TypeError('text must be a string');
    const requestId = newRequestId();
    const frame = JSON.stringify({ type: 'message', text, requestId });
    if (utf8Length(frame) > this.options.maxPayloadBytes) {
      // The relay would close the whole connection (1009); refuse locally instead.
      this._emit('error', {
        code: 'too_large', local: true, text, willRetry: false,
        message: `Message is too large to send (over ${this.options.maxPayloadBytes} bytes encoded).`,
      });
      return null;
    }
    this._outbox.push({ requestId, room: this.options.room, text, frame, sentOn: null, sentSeq: 0 });
    while (this._outbox.length > this.options.maxQueue) {
      // Drop the oldest message that is not on the wire right now (else simply the oldest).
      const waiting = this._outbox.findIndex((e) => e.sentOn === null);
      const [dropped] = this._outbox.splice(waiting >= 0 ? waiting : 0, 1);
      this._emit('notice', {
        kind: 'queue_dropped', text: dropped.text, requestId: dropped.requestId,
        message: `The send queue is full (${this.options.maxQueue}); dropped the oldest waiting message.`,
      });
    }
    this._emitQueue();
    this._flush();
    return requestId;
  }

  // ---- connection lifecycle -------------------------------------------------------------

  _open() {
    clearTimeout(this._timers.reconnect);
    const gen = ++this._gen;
    const WS = this.options.WebSocket ?? globalThis.WebSocket;
    let ws;
    try {
      ws = new WS(this._url('ws'));
    } catch (err) {
      this._stop({ reason: 'bad_url', message: `Cannot connect: ${err.message}` });
      return;
    }
    this._ws = ws;
    let opened = false;
    this._setState('connecting', { attempt: this._attempt });
    ws.addEventListener('open', () => {
      if (ws !== this._ws) return;
      opened = true;
      this._acceptedButFailing = 0;
      this._rateLimited = false; // the relay counts per connection
      this._pausedUntil = 0;
      this._timers.stable = setTimeout(() => { this._attempt = 0; }, this.options.stableAfterMs);
      this._setState('open', { attempt: this._attempt });
      this._flush();
    });
    ws.addEventListener('message', (ev) => {
      if (ws === this._ws) this._receive(ev.data);
    });
    ws.addEventListener('close', (ev) => {
      if (ws !== this._ws) return;
      this._ws = null;
      this._onClose(gen, ev, opened, ws);
    });
  }

  _onClose(gen, ev, opened, ws) {
    clearTimeout(this._timers.stable);
    clearTimeout(this._timers.flush);
    this._online = null;
    const info = { code: ev.code, reason: ev.reason || describeClose(ev.code) };
    if (this._deliberate) { this._setState('closed', info); return; }
    if (ev.code === 1008) {
      this._stop({ ...info, reason: 'policy', message: `The relay closed the connection: ${describeClose(1008)}.` });
      return;
    }
    if (ev.code === 1009) {
      // The oldest unacknowledged message made the relay close; do not send it again.
      const idx = this._oldestInFlight(ws);
      if (idx >= 0) {
        const [bad] = this._outbox.splice(idx, 1);
        this._emit('error', { code: 'too_large', text: bad.text, willRetry: false, message: 'The relay closed the connection because a message was too big.' });
        this._emitQueue();
      }
    }
    for (const e of this._outbox) e.sentOn = null; // everything unacked is resent after reconnecting
    if (!opened) { this._probe(gen, info); return; }
    let floor = 0;
    if (ev.code === 1013) { this._attempt = Math.max(this._attempt, 2); floor = this.options.slowFloorMs; }
    if (ev.code === 1001) this._attempt = Math.max(this._attempt, 1);
    this._reconnectLater(info, floor);
  }

  /** The socket closed without ever opening: ask the relay why with a plain GET. */
  async _probe(gen, info) {
    this._setState('connecting', { attempt: this._attempt, probing: true });
    let status = await this._ask('GET');
    if (status === 426 && gen === this._gen && !this._deliberate) {
      // Browsers send no Origin header with a same-origin GET, so the relay could only judge the
      // token. A POST always carries Origin: ask again to learn whether the origin is the problem.
      const viaPost = await this._ask('POST');
      if (viaPost === 403) status = 403;
    }
    if (gen !== this._gen || this._deliberate) return;
    const refusal = REFUSALS[status];
    if (refusal) {
      const [reason, message] = refusal;
      this._emit('refused', { status, reason, message });
      this._stop({ ...info, probeStatus: status, reason, message });
      return;
    }
    let floor = 0;
    if (status === 426) {
      this._acceptedButFailing++;
      if (this._acceptedButFailing === 3) {
        this._emit('notice', {
          kind: 'origin_suspect',
          message: 'The relay accepts the credentials, but the WebSocket keeps failing to open (is this page’s origin allowed, or is a proxy blocking WebSockets?). Still retrying.',
        });
      }
    } else if (status === 503) {
      floor = this.options.baseDelayMs; // full or shutting down: give it room
    }
    this._reconnectLater({ ...info, probeStatus: status }, floor);
  }

  /** Plain HTTP request to the /chat URL; resolves to the status, or 0 when there is no answer. */
  async _ask(method) {
    const fetchFn = this.options.fetch ?? globalThis.fetch?.bind(globalThis);
    if (!fetchFn) return 0;
    const ctrl = typeof AbortController === 'function' ? new AbortController() : null;
    const timer = setTimeout(() => ctrl?.abort(), this.options.probeTimeoutMs);
    try {
      const res = await fetchFn(this._url('http'), {
        method, cache: 'no-store', credentials: 'omit', redirect: 'manual', signal: ctrl?.signal,
      });
      res.body?.cancel?.().catch?.(() => {});
      return res.status;
    } catch {
      return 0; // relay unreachable (or a cross-origin answer this page may not read)
    } finally {
      clearTimeout(timer);
    }
  }

  _reconnectLater(info, floorMs = 0) {
    const { baseDelayMs, maxDelayMs, random } = this.options;
    const ceiling = Math.min(maxDelayMs, baseDelayMs * 2 ** this._attempt);
    const delayMs = Math.round(Math.min(maxDelayMs, floorMs + random() * ceiling)); // full jitter
    this._attempt++;
    this._setState('reconnecting', { ...info, attempt: this._attempt, delayMs });
    this._schedule(delayMs);
  }

  _schedule(delayMs) {
    clearTimeout(this._timers.reconnect);
    this._timers.reconnect = setTimeout(() => this._open(), delayMs);
  }

  _stop(detail) {
    this._deliberate = true;
    this._gen++;
    this._clearTimers();
    globalThis.removeEventListener?.('online', this._onBrowserOnline);
    this._closeSocket(1000, 'stopping');
    this._setState('stopped', detail);
  }

  _closeSocket(code, reason) {
    const ws = this._ws;
    if (!ws) return false;
    this._ws = null; // its close event is ignored from now on
    for (const e of this._outbox) if (e.sentOn === ws) e.sentOn = null; // unacked: resend later
    try { ws.close(code, reason); } catch { /* already closing */ }
    return true;
  }

  _clearTimers() {
    for (const t of Object.values(this._timers)) clearTimeout(t);
  }

  _url(kind) {
    const o = this.options;
    const base = o.url ?? globalThis.location?.href;
    const u = new URL(o.path, base);
    const secure = u.protocol === 'https:' || u.protocol === 'wss:';
    u.protocol = kind === 'ws' ? (secure ? 'wss:' : 'ws:') : (secure ? 'https:' : 'http:');
    const q = new URLSearchParams({ token: o.token, name: o.name, room: o.room });
    const resume = this._rooms.get(o.room);
    if (resume?.epoch != null) {
      q.set('since', String(resume.lastSeq));
      q.set('epoch', resume.epoch);
    }
    // The same session again, so a message resent after the reconnect is recognised as a retry.
    if (this._session) q.set('session', this._session);
    u.search = q.toString();
    return u.toString();
  }

  // ---- incoming events --------------------------------------------------------------------

  _receive(data) {
    if (typeof data !== 'string') return;
    let ev;
    try { ev = JSON.parse(data); } catch { return; }
    if (!ev || typeof ev !== 'object') return;
    switch (ev.type) {
      case 'system':
        if (typeof ev.session === 'string' && SESSION.test(ev.session)) this._session = ev.session;
        this._emit('system', { message: ev.message, clientId: ev.clientId, session: ev.session });
        break;
      case 'history':
        this._onHistory(ev);
        break;
      case 'message': {
        const m = ev.message;
        const st = this._roomState(m?.room ?? this.options.room);
        const before = st.lastSeq;
        if (!this._accept(m, st)) break;
        if (before > 0 && Number.isInteger(m.seq) && m.seq > before + 1) {
          this._emit('notice', { kind: 'gap', message: `Messages ${before + 1}–${m.seq - 1} were not received.` });
        }
        this._emit('message', { message: m });
        break;
      }
      case 'presence':
        if (typeof ev.online === 'number') this._online = ev.online;
        this._emit('presence', {
          online: ev.online, message: ev.message,
          joined: Array.isArray(ev.joined) ? ev.joined : [], left: Array.isArray(ev.left) ? ev.left : [],
        });
        break;
      case 'ack': {
        const idx = this._outbox.findIndex((e) => e.requestId === ev.requestId);
        if (idx >= 0) this._outbox.splice(idx, 1);
        this._rateLimitStreak = 0;
        this._rateLimited = false;
        this._emit('ack', { requestId: ev.requestId, id: ev.id, seq: ev.seq, duplicate: ev.duplicate === true });
        this._emitQueue();
        this._flush();
        break;
      }
      case 'error':
        this._onRelayError(ev);
        break;
      default:
        break;
    }
  }

  _onHistory(ev) {
    const room = typeof ev.room === 'string' ? ev.room : this.options.room;
    const st = this._roomState(room);
    const resumed = st.epoch != null;
    const epoch = ev.epoch != null ? String(ev.epoch) : null;
    const epochChanged = resumed && epoch != null && epoch !== st.epoch;
    if (epochChanged) st.lastSeq = 0; // seq numbering restarts with a new epoch
    if (epoch != null) st.epoch = epoch;
    const messages = (Array.isArray(ev.messages) ? ev.messages : []).filter((m) => this._accept(m, st));
    const complete = ev.complete !== false;
    this._emit('history', { room, epoch, messages, complete: ev.complete, resumed, epochChanged });
    if (!complete || epochChanged) {
      this._emit('notice', {
        kind: 'history_incomplete', epochChanged, complete: ev.complete,
        message: epochChanged
          ? 'History may be incomplete: the relay lost this room’s earlier messages (it restarted).'
          : 'History may be incomplete: some messages sent while you were away are no longer available.',
      });
    }
  }

  /** True if the message is new; records it. Never lets the same message through twice. */
  _accept(m, st) {
    if (!m || typeof m !== 'object') return false;
    if (m.id != null && this._seen.has(m.id)) return false;
    if (Number.isInteger(m.seq)) {
      if (m.seq <= st.lastSeq) return false;
      st.lastSeq = m.seq;
    }
    if (m.id != null) {
      this._seen.add(m.id);
      this._seenOrder.push(m.id);
      if (this._seenOrder.length > 2000) this._seen.delete(this._seenOrder.shift());
    }
    return true;
  }

  _roomState(room) {
    let st = this._rooms.get(room);
    if (!st) { st = { epoch: null, lastSeq: 0 }; this._rooms.set(room, st); }
    return st;
  }

  _onRelayError(ev) {
    const code = typeof ev.code === 'string' ? ev.code : 'unknown';
    // The relay answers each message frame in order with an ack or an error, so an error belongs
    // to the oldest message in flight on this socket.
    const idx = this._ws ? this._oldestInFlight(this._ws) : -1;
    const entry = idx >= 0 ? this._outbox[idx] : null;
    let willRetry = false;
    let retryInMs;
    if (entry && DROP_CODES.has(code)) {
      this._outbox.splice(idx, 1);
    } else if (entry && code === 'rate_limited') {
      // Keep it (the relay did not store it) and try again after a pause that grows while the
      // relay keeps refusing; until an ack arrives, only one message at a time is on the wire, so
      // a long queue does not turn into a burst of errors (which the relay punishes with 1008).
      // Messages still in flight keep their place and get their own answer.
      willRetry = true;
      entry.sentOn = null;
      this._rateLimited = true;
      const now = Date.now();
      if (now >= this._pausedUntil) {
        const pause = this.options.rateLimitPauseMs * 2 ** this._rateLimitStreak++;
        this._pausedUntil = now + Math.min(this.options.maxDelayMs, pause);
      }
      retryInMs = this._pausedUntil - now;
    }
    this._emit('error', { code, message: ev.message, text: entry?.text, requestId: entry?.requestId, willRetry, retryInMs });
    this._emitQueue();
    this._flush();
  }

  // ---- sending -----------------------------------------------------------------------------

  _flush() {
    clearTimeout(this._timers.flush);
    const ws = this._ws;
    if (!ws || ws.readyState !== OPEN) return;
    const wait = this._pausedUntil - Date.now();
    if (wait > 0) { this._timers.flush = setTimeout(() => this._flush(), wait); return; }
    let inFlight = this._outbox.filter((e) => e.sentOn === ws).length;
    const maxInFlight = this._rateLimited ? 1 : this.options.maxInFlight;
    for (const e of this._outbox) {
      if (e.sentOn === ws || e.room !== this.options.room) continue;
      if (inFlight >= maxInFlight) return; // the next ack (or error) calls _flush again
      if (ws.bufferedAmount >= this.options.maxBufferedBytes) {
        this._timers.flush = setTimeout(() => this._flush(), 100);
        return;
      }
      ws.send(e.frame);
      e.sentOn = ws;
      e.sentSeq = ++this._sendCounter;
      inFlight++;
    }
  }

  /** Index of the message sent earliest among those awaiting an answer on `ws`, or -1. */
  _oldestInFlight(ws) {
    let best = -1;
    this._outbox.forEach((e, i) => {
      if (e.sentOn === ws && (best < 0 || e.sentSeq < this._outbox[best].sentSeq)) best = i;
    });
    return best;
  }

  _dropOtherRooms() {
    const keep = this._outbox.filter((e) => e.room === this.options.room);
    for (const e of this._outbox) {
      if (e.room !== this.options.room) {
        this._emit('notice', { kind: 'queue_dropped', text: e.text, requestId: e.requestId, message: `Dropped a message queued for room ${e.room}.` });
      }
    }
    if (keep.length !== this._outbox.length) { this._outbox = keep; this._emitQueue(); }
  }

  // ---- events ------------------------------------------------------------------------------

  _setState(state, detail = {}) {
    this._state = state;
    this._emit('status', { state, attempt: this._attempt, ...detail });
  }

  _emitQueue() {
    this._emit('queue', { queued: this._outbox.length });
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}
