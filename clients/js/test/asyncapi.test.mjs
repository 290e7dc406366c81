// The AsyncAPI document a pod serves, read by the real AsyncAPI parser: no
// error or warning, and it describes the sockets and the SSE stream with
// every frame of the generated client types. Started by
// tests/integration/test_js_client.py (DC_PODS).
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import { Parser } from "@asyncapi/parser";

const PODS = (process.env.DC_PODS ?? "").split(",").filter(Boolean);
const skip = PODS.length === 0 ? "run by tests/integration/test_js_client.py" : false;

test("the served AsyncAPI document parses cleanly and has every frame", { skip }, async () => {
  const response = await fetch(`${PODS[0]}/asyncapi.json`);
  assert.equal(response.status, 200);
  const { document, diagnostics } = await new Parser().parse(await response.text());
  // Severity 0 is an error, 1 a warning.
  assert.deepEqual(diagnostics.filter((d) => d.severity <= 1), []);
  assert.ok(document, "the parser built a document");
  assert.match(document.version(), /^3\./);
  const addresses = document.channels().all().map((c) => c.address());
  assert.ok(addresses.includes("/v1/threads/{thread_id}/ws"));
  assert.ok(addresses.includes("/v1/threads/{thread_id}/events"));
  // The generated TypeScript types and the document name the same frames.
  const types = readFileSync(new URL("../src/protocol.ts", import.meta.url), "utf8");
  const typed = new Set([...types.matchAll(/^ {2}type: "(\w+)";$/gm)].map((m) => m[1]));
  const documented = new Set(document.messages().all().map((m) => m.name()));
  assert.deepEqual([...documented].sort(), [...typed].sort());
  const socket = document.channels().all().find((c) => c.address().endsWith("/ws"));
  const sent = socket.operations().all().filter((o) => o.action() === "send");
  assert.ok(sent[0].messages().all().some((m) => m.name() === "delta"));
});
