// An app using Intercom's official Node SDK (intercom-client, pinned in package.json) with
// only its base URL pointed at the daemon. Driven by test_node_sdk.py:
//   node node_sdk_client.js <daemon-url> <calls.json>
// calls.json is a list of {"method": "create" | "summaries" | "list", "request": {...}}.
// Prints one JSON line: per call {"ok": true, "data": ...} or {"ok": false, "status", "body"}.
"use strict";

const fs = require("node:fs");
const { IntercomClient } = require("intercom-client");

async function main() {
  const [baseUrl, callsPath] = process.argv.slice(2);
  const calls = JSON.parse(fs.readFileSync(callsPath, "utf8"));
  const client = new IntercomClient({
    token: "the-apps-token-never-leaves-the-app",
    baseUrl,
    maxRetries: 0,
    timeoutInSeconds: 10,
  });
  const results = [];
  for (const { method, request } of calls) {
    try {
      const data = await client.events[method](request);
      results.push({ ok: true, data: data === undefined ? null : data });
    } catch (err) {
      if (err.statusCode === undefined) throw err;
      results.push({ ok: false, status: err.statusCode, body: err.body });
    }
  }
  process.stdout.write(JSON.stringify(results) + "\n");
}

main().catch((err) => {
  process.stderr.write(`${err.stack || err}\n`);
  process.exit(1);
});
