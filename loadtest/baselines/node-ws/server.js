// A typical Node `ws` chat server, written the way the widely published tutorials write it,
// speaking roomcast's compatible contract (docs/CONTRACT-NOTES.md, issue 2). It is the baseline
// roomcast-load measures roomcast against, so it is deliberately ordinary: rooms are a Map of
// Sets, history is an array per room, each broadcast stringifies once and calls ws.send() per
// member, and the heartbeat is the ws README's isAlive sweep over every client at once.
// It has none of roomcast's own additions (seq/epoch resume, acks, presence coalescing,
// slow-consumer closes, abuse closes).
//
// Start: `PORT=0 HOST=127.0.0.1 node server.js`; the first stdout line is
//   node-ws listening on http://HOST:PORT (max connections N)
// which roomcast-load parses like roomcast's own first line.
'use strict';

const http = require('http');
const crypto = require('crypto');
const { WebSocketServer, WebSocket } = require('ws');

function intEnv(name, fallback) {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  const n = Number(raw);
  if (!Number.isFinite(n) || n < 0) {
    console.error(`invalid ${name}=${raw}`);
    process.exit(2);
  }
  return n;
}

const HOST = process.env.HOST || '0.0.0.0';
const PORT = intEnv('PORT', 8080);
const CHAT_TOKEN = process.env.CHAT_TOKEN || 'dev-token';
const RATE_LIMIT = intEnv('RATE_LIMIT', 20);
const RATE_WINDOW_MS = intEnv('RATE_WINDOW_MS', 10000);
const HISTORY_LIMIT = intEnv('HISTORY_LIMIT', 50);
const MAX_TEXT_CHARS = intEnv('MAX_TEXT_CHARS', 500);
const MAX_PAYLOAD_BYTES = intEnv('MAX_PAYLOAD_BYTES', 2048);
const HEARTBEAT_MS = intEnv('HEARTBEAT_MS', 30000);
const MAX_CONNECTIONS = intEnv('MAX_CONNECTIONS', 10000);

if (CHAT_TOKEN === 'dev-token') {
  console.error('warning: using the development token; set CHAT_TOKEN for anything real');
}

const rooms = new Map(); // room name -> Set<WebSocket>
const histories = new Map(); // room name -> Array<message>
let nextClientId = 1;

function allowedOrigins(port) {
  if (process.env.ALLOWED_ORIGINS) {
    return new Set(process.env.ALLOWED_ORIGINS.split(',').map((s) => s.trim()).filter(Boolean));
  }
  return new Set([`http://localhost:${port}`, `http://127.0.0.1:${port}`]);
}
let ORIGINS = allowedOrigins(PORT);

function tokenOk(given) {
  if (typeof given !== 'string') return false;
  const a = Buffer.from(given);
  const b = Buffer.from(CHAT_TOKEN);
  return a.length === b.length && crypto.timingSafeEqual(a, b);
}

function cleanName(raw) {
  const s = typeof raw === 'string' ? raw.trim() : '';
  return /^[A-Za-z0-9_ -]{1,24}$/.test(s) ? s : 'guest';
}

function cleanRoom(raw) {
  const s = typeof raw === 'string' ? raw.trim() : '';
  return /^[A-Za-z0-9_-]{1,32}$/.test(s) ? s : 'lobby';
}

function send(ws, obj) {
  if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(obj));
}

function broadcast(room, obj) {
  const members = rooms.get(room);
  if (!members) return;
  const data = JSON.stringify(obj);
  for (const client of members) {
    if (client.readyState === WebSocket.OPEN) client.send(data);
  }
}

function sendError(ws, code, message) {
  send(ws, { type: 'error', code, message });
}

function reject(socket, status, text) {
  socket.write(
    `HTTP/1.1 ${status} ${http.STATUS_CODES[status]}\r\n` +
      'Content-Type: text/plain\r\nConnection: close\r\n' +
      `Content-Length: ${Buffer.byteLength(text)}\r\n\r\n${text}`,
  );
  socket.destroy();
}

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://placeholder');
  if (url.pathname === '/healthz') {
    res.writeHead(200, { 'Content-Type': 'application/json' });
    res.end(JSON.stringify({ ok: true, clients: wss.clients.size }));
    return;
  }
  if (url.pathname === '/chat') {
    const origin = req.headers.origin;
    if (origin !== undefined && !ORIGINS.has(origin)) {
      res.writeHead(403, { 'Content-Type': 'text/plain' });
      res.end('origin not allowed');
      return;
    }
    if (!tokenOk(url.searchParams.get('token'))) {
      res.writeHead(401, { 'Content-Type': 'text/plain' });
      res.end('invalid token');
      return;
    }
    res.writeHead(426, { 'Content-Type': 'text/plain' });
    res.end('upgrade required');
    return;
  }
  res.writeHead(404, { 'Content-Type': 'text/plain' });
  res.end('not found');
});

const wss = new WebSocketServer({ noServer: true, maxPayload: MAX_PAYLOAD_BYTES });

server.on('upgrade', (req, socket, head) => {
  socket.on('error', () => {});
  const url = new URL(req.url, 'http://placeholder');
  if (url.pathname !== '/chat') return reject(socket, 404, 'not found');
  if (!req.headers.origin || !ORIGINS.has(req.headers.origin)) {
    return reject(socket, 403, 'origin not allowed');
  }
  if (!tokenOk(url.searchParams.get('token'))) return reject(socket, 401, 'invalid token');
  if (wss.clients.size >= MAX_CONNECTIONS) return reject(socket, 503, 'server full');
  wss.handleUpgrade(req, socket, head, (ws) => {
    wss.emit('connection', ws, url);
  });
});

wss.on('connection', (ws, url) => {
  ws.isAlive = true;
  ws.clientId = nextClientId++;
  ws.name = cleanName(url.searchParams.get('name'));
  ws.room = cleanRoom(url.searchParams.get('room'));
  ws.windowStart = Date.now();
  ws.windowCount = 0;

  if (!rooms.has(ws.room)) rooms.set(ws.room, new Set());
  if (!histories.has(ws.room)) histories.set(ws.room, []);
  const members = rooms.get(ws.room);
  members.add(ws);

  send(ws, { type: 'system', message: `connected as ${ws.name}`, clientId: ws.clientId });
  send(ws, { type: 'history', room: ws.room, messages: histories.get(ws.room) });
  broadcast(ws.room, { type: 'presence', message: `${ws.name} joined`, online: members.size });

  ws.on('pong', () => {
    ws.isAlive = true;
  });

  ws.on('message', (data, isBinary) => {
    if (isBinary) {
      ws.close(1003, 'binary frames are not accepted');
      return;
    }
    const now = Date.now();
    if (now - ws.windowStart >= RATE_WINDOW_MS) {
      ws.windowStart = now;
      ws.windowCount = 0;
    }
    ws.windowCount += 1;
    if (ws.windowCount > RATE_LIMIT) {
      sendError(ws, 'rate_limited', 'slow down: too many messages');
      return;
    }
    let msg;
    try {
      msg = JSON.parse(data.toString());
    } catch {
      sendError(ws, 'bad_json', 'message is not valid JSON');
      return;
    }
    if (msg === null || typeof msg !== 'object' || Array.isArray(msg) || msg.type !== 'message') {
      sendError(ws, 'bad_type', 'expected {"type":"message","text":"..."}');
      return;
    }
    if (msg.text !== undefined && typeof msg.text !== 'string') {
      sendError(ws, 'bad_type', 'text must be a string');
      return;
    }
    const text = typeof msg.text === 'string' ? msg.text.trim() : '';
    if (text.length === 0) {
      sendError(ws, 'empty', 'message text is empty');
      return;
    }
    if (text.length > MAX_TEXT_CHARS && Array.from(text).length > MAX_TEXT_CHARS) {
      sendError(ws, 'too_large', `message text is longer than ${MAX_TEXT_CHARS} characters`);
      return;
    }
    const message = {
      id: crypto.randomUUID(),
      room: ws.room,
      from: ws.name,
      text,
      sentAt: new Date().toISOString(),
    };
    const history = histories.get(ws.room);
    history.push(message);
    if (history.length > HISTORY_LIMIT) history.shift();
    broadcast(ws.room, { type: 'message', message });
  });

  ws.on('close', () => {
    members.delete(ws);
    if (members.size === 0) {
      rooms.delete(ws.room);
    } else {
      broadcast(ws.room, { type: 'presence', message: `${ws.name} left`, online: members.size });
    }
  });

  ws.on('error', () => {});
});

// The ws README's heartbeat: every interval, sweep all clients; terminate those that did not
// answer the previous ping, ping the rest.
let heartbeatTerminations = 0;
const heartbeat = setInterval(() => {
  wss.clients.forEach((ws) => {
    if (ws.isAlive === false) {
      heartbeatTerminations += 1;
      ws.terminate();
      return;
    }
    ws.isAlive = false;
    ws.ping();
  });
}, HEARTBEAT_MS);

wss.on('close', () => clearInterval(heartbeat));

function shutdown() {
  clearInterval(heartbeat);
  server.close();
  for (const ws of wss.clients) ws.close(1001, 'server shutting down');
  setTimeout(() => process.exit(0), 1000).unref();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);

server.listen(PORT, HOST, () => {
  const { address, port } = server.address();
  if (!process.env.ALLOWED_ORIGINS) ORIGINS = allowedOrigins(port);
  const shown = address.includes(':') ? `[${address}]` : address;
  console.log(`node-ws listening on http://${shown}:${port} (max connections ${MAX_CONNECTIONS})`);
});
