// Starts the real roomcast relay binary for a test (it builds nothing) and stops it again.
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
export const RELAY_BIN = path.resolve(here, process.env.ROOMCAST_BIN ?? '../../target/debug/roomcast');

const running = new Set();
// Last line of defence: never leave a relay behind, whatever happens to the test process.
process.on('exit', () => { for (const child of running) child.kill('SIGKILL'); });

/** A TCP port that was free a moment ago on 127.0.0.1. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/**
 * Starts the relay on 127.0.0.1:port (a free port unless given) and resolves once its first
 * stdout line says it is listening. `env` adds or overrides settings (RATE_LIMIT, ...).
 * `extraOrigins` are allowed besides the relay's own origin (pages served from elsewhere).
 */
export async function startRelay({ port, env = {}, extraOrigins = [], startTimeoutMs = 15_000 } = {}) {
  if (!existsSync(RELAY_BIN)) {
    throw new Error(`relay binary not found at ${RELAY_BIN} — build it first (cargo build --bin roomcast) or set ROOMCAST_BIN`);
  }
  port ??= await freePort();
  const origin = `http://127.0.0.1:${port}`;
  const child = spawn(RELAY_BIN, [], {
    env: {
      ...process.env,
      HOST: '127.0.0.1',
      PORT: String(port),
      ALLOWED_ORIGINS: [origin, ...extraOrigins].join(','),
      RUST_LOG: process.env.RUST_LOG ?? 'info',
      // No load balancer to wait for: a stopped relay closes its WebSockets at once.
      LAME_DUCK_MS: '0',
      ...env,
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  running.add(child);
  const logs = [];
  const exited = new Promise((resolve) => {
    child.on('exit', (code, signal) => { running.delete(child); resolve({ code, signal }); });
  });
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (chunk) => { logs.push(chunk); if (logs.length > 2000) logs.shift(); });

  const firstLine = await new Promise((resolve, reject) => {
    let buf = '';
    let settled = false;
    const timer = setTimeout(() => fail(new Error(`relay did not report listening within ${startTimeoutMs} ms`)), startTimeoutMs);
    const onData = (chunk) => {
      buf += chunk;
      const nl = buf.indexOf('\n');
      if (nl >= 0 && !settled) {
        settled = true;
        clearTimeout(timer);
        child.stdout.off('data', onData);
        resolve(buf.slice(0, nl));
      }
    };
    const fail = (err) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      child.kill('SIGKILL');
      reject(err);
    };
    child.stdout.setEncoding('utf8');
    child.stdout.on('data', onData);
    exited.then(({ code, signal }) => fail(new Error(`relay exited early (code ${code}, signal ${signal}):\n${logs.join('')}`)));
  });
  child.stdout.resume(); // keep draining stdout
  const m = /^roomcast listening on http:\/\/127\.0\.0\.1:(\d+)\b/.exec(firstLine);
  if (!m || Number(m[1]) !== port) {
    child.kill('SIGKILL');
    throw new Error(`unexpected first stdout line from the relay: ${JSON.stringify(firstLine)}`);
  }

  return {
    port,
    origin,
    child,
    firstLine,
    logs: () => logs.join(''),
    get running() { return child.exitCode === null && child.signalCode === null; },
    exited,
    /** SIGTERM (graceful: close 1001 to everyone), then SIGKILL if it has not exited in time. */
    async stop({ timeoutMs = 8_000 } = {}) {
      if (child.exitCode !== null || child.signalCode !== null) return exited;
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
      const result = await exited;
      clearTimeout(timer);
      return result;
    },
    kill() {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      return exited;
    },
    async metrics() {
      const res = await fetch(`${origin}/metrics`, { signal: AbortSignal.timeout(5_000) });
      if (!res.ok) throw new Error(`/metrics answered ${res.status}`);
      return res.text();
    },
  };
}

/** The value of one Prometheus sample, e.g. metric(text, 'x_total', {reason: 'unauthorized'}); 0 if absent. */
export function metricValue(text, name, labels = {}) {
  for (const line of text.split('\n')) {
    if (!line.startsWith(name)) continue;
    const m = /^([a-zA-Z_:][\w:]*)(?:\{([^}]*)\})?\s+(\S+)/.exec(line);
    if (!m || m[1] !== name) continue;
    const got = Object.fromEntries([...(m[2] ?? '').matchAll(/(\w+)="([^"]*)"/g)].map((x) => [x[1], x[2]]));
    if (Object.entries(labels).every(([k, v]) => got[k] === v)) return Number(m[3]);
  }
  return 0;
}
