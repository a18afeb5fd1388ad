#!/usr/bin/env bash
# Checks the roomcast-client npm package (src/web/package.json): `npm pack` ships the module, its
# types and the licence and nothing else; the types agree with the module (check-types.mjs); and
# an app using the installed tarball type-checks with `tsc --strict` (usage.ts).
# Installs TypeScript (pinned in package-lock.json) from the npm registry when missing.
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -d node_modules/typescript ]; then
  echo "js-client: installing npm dependencies" >&2
  npm ci --no-audit --no-fund
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
(cd ../../src/web && npm pack --silent --json --pack-destination "$out" >"$out/pack.json")
node -e '
  const [pack] = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
  const files = pack.files.map((f) => f.path).sort().join(" ");
  const want = "LICENSE package.json roomcast-client.d.ts roomcast-client.js";
  if (files !== want) { console.error(`npm pack ships [${files}], expected [${want}]`); process.exit(1); }
  console.log(`npm pack: ${pack.filename}, ${pack.size} bytes: ${files}`);
' "$out/pack.json"
[ ! -e ../../src/web/LICENSE ] || { echo "js-client: npm pack left src/web/LICENSE behind" >&2; exit 1; }

node check-types.mjs
npm install --no-save --no-audit --no-fund --no-package-lock "$out"/roomcast-client-*.tgz >/dev/null
npx --no-install tsc -p tsconfig.json
echo "js-client: usage.ts type-checks against the packed roomcast-client"
