// A tiny static HTTP server for pages that are not served by the relay (the seed clients), so
// they run on an origin of their own, as a real deployment's web page would.
import { readFile } from 'node:fs/promises';
import http from 'node:http';
import path from 'node:path';

const TYPES = { '.html': 'text/html; charset=utf-8', '.js': 'text/javascript; charset=utf-8', '.css': 'text/css; charset=utf-8' };

/**
 * Serves the files of `root` on 127.0.0.1 (a free port unless given). `/` is `index.html`.
 * Resolves to { port, origin, requests, close() }; `requests` counts what was asked for.
 */
export function serveStatic(root, { port = 0 } = {}) {
  const base = path.resolve(root);
  const requests = [];
  const server = http.createServer(async (req, res) => {
    requests.push(req.url);
    let urlPath;
    try { urlPath = decodeURIComponent(new URL(req.url, 'http://x').pathname); } catch { res.writeHead(400).end(); return; }
    const file = path.join(base, urlPath.endsWith('/') ? `${urlPath}index.html` : urlPath);
    if ((req.method !== 'GET' && req.method !== 'HEAD') || !file.startsWith(base + path.sep)) {
      res.writeHead(req.method === 'GET' || req.method === 'HEAD' ? 404 : 405).end();
      return;
    }
    try {
      const body = await readFile(file);
      res.writeHead(200, { 'content-type': TYPES[path.extname(file)] ?? 'application/octet-stream', 'cache-control': 'no-store' });
      res.end(req.method === 'HEAD' ? undefined : body);
    } catch {
      res.writeHead(404).end();
    }
  });
  // Keep-alive sockets from the browser would otherwise hold close() open until they time out.
  const sockets = new Set();
  server.on('connection', (s) => { sockets.add(s); s.on('close', () => sockets.delete(s)); });
  return new Promise((resolve, reject) => {
    server.on('error', reject);
    server.listen(port, '127.0.0.1', () => {
      const actual = server.address().port;
      resolve({
        port: actual,
        origin: `http://127.0.0.1:${actual}`,
        requests,
        close() {
          for (const s of sockets) s.destroy();
          return new Promise((r) => server.close(() => r()));
        },
      });
    });
  });
}
