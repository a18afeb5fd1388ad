// The declarations of roomcast-client.d.ts against the module itself: every export and every
// public member of RoomcastClient declared there exists in roomcast-client.js and the other way
// round, the event map names exactly the events the module emits, and the package's version is
// the relay's. Run by run.sh after `npm ci` (TypeScript's parser reads the .d.ts).
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import ts from 'typescript';

const here = path.dirname(fileURLToPath(import.meta.url));
const web = path.resolve(here, '../../src/web');
const dtsPath = path.join(web, 'roomcast-client.d.ts');
const jsPath = path.join(web, 'roomcast-client.js');
const source = ts.createSourceFile(dtsPath, readFileSync(dtsPath, 'utf8'), ts.ScriptTarget.ES2022, true);

const exported = new Set();
const members = new Set();
let events = [];
let noticeKinds = [];
const isExported = (node) => node.modifiers?.some((m) => m.kind === ts.SyntaxKind.ExportKeyword);
for (const node of source.statements) {
  if (ts.isClassDeclaration(node) && isExported(node)) {
    exported.add(node.name.text);
    if (node.name.text === 'RoomcastClient') {
      for (const m of node.members) if (m.name) members.add(m.name.getText(source));
    }
  } else if (ts.isFunctionDeclaration(node) && isExported(node)) {
    exported.add(node.name.text);
  } else if (ts.isInterfaceDeclaration(node) && node.name.text === 'RoomcastEventMap') {
    events = node.members.map((m) => m.name.getText(source));
  } else if (ts.isTypeAliasDeclaration(node) && node.name.text === 'NoticeKind') {
    noticeKinds = node.type.types.map((t) => t.literal.text);
  }
}

const mod = await import(jsPath);
const runtimeExports = new Set(Object.keys(mod));
assert.deepEqual([...exported].sort(), [...runtimeExports].sort(), 'values exported by the .d.ts and by the module');

const { RoomcastClient } = mod;
const client = new RoomcastClient({ url: 'http://127.0.0.1:1' });
const inherited = new Set(['addEventListener', 'removeEventListener']);
for (const name of members) {
  if (inherited.has(name)) continue;
  assert.ok(name in client, `RoomcastClient.${name} is declared but the module has no such member`);
}
const publicRuntime = [
  ...Object.getOwnPropertyNames(RoomcastClient.prototype),
  ...Object.keys(client),
].filter((n) => n !== 'constructor' && !n.startsWith('_'));
for (const name of publicRuntime) {
  assert.ok(members.has(name), `RoomcastClient.${name} exists in the module but is not declared`);
}

const js = readFileSync(jsPath, 'utf8');
const emitted = new Set([...js.matchAll(/_emit\('([a-z_]+)'/g)].map((m) => m[1]));
emitted.add('status'); // emitted by _setState
assert.deepEqual([...events].sort(), [...emitted].sort(), 'RoomcastEventMap names exactly the events the module emits');

const kinds = new Set([...js.matchAll(/kind: '([a-z_]+)'/g)].map((m) => m[1]));
assert.deepEqual([...noticeKinds].sort(), [...kinds].sort(), 'NoticeKind lists exactly the notice kinds the module emits');

const pkg = JSON.parse(readFileSync(path.join(web, 'package.json'), 'utf8'));
const cargo = readFileSync(path.resolve(here, '../../Cargo.toml'), 'utf8');
const relayVersion = /^version\s*=\s*"([^"]+)"/m.exec(cargo)?.[1];
assert.equal(pkg.version, relayVersion, 'src/web/package.json version follows Cargo.toml');

console.log(`check-types: ${exported.size} exports, ${members.size} members, ${events.length} events agree with the module`);
