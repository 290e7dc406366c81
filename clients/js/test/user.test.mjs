// The user-socket client (GET /v1/ws) against real pods (DC_PODS, DC_TOKENS,
// from tests/integration/test_js_client.py): the inbox, a joined thread's
// turn, and exact resume of the joined thread after the socket drops.
import assert from "node:assert/strict";
import { test } from "node:test";

import { DurableUserClient } from "../dist/index.js";

const PODS = (process.env.DC_PODS ?? "").split(",").filter(Boolean);
const TOKENS = JSON.parse(process.env.DC_TOKENS ?? "{}");
const skip = PODS.length < 2 ? "run by tests/integration/test_js_client.py" : false;

function until(client, predicate, label) {
  const seen = [];
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`timed out waiting for ${label}`)), 15000);
    const off = client.on((event) => {
      seen.push(event);
      if (predicate(event)) {
        clearTimeout(timer);
        off();
        resolve(seen);
      }
    });
  });
}

async function createThread(id) {
  const made = await fetch(`${PODS[0]}/v1/threads`, {
    method: "POST",
    headers: { authorization: `Bearer ${TOKENS.alice}`, "content-type": "application/json" },
    body: JSON.stringify({ id }),
  });
  assert.equal(made.status, 201);
}

test("the inbox, a joined thread's reply, and its card updated", { skip }, async () => {
  const thread = `user-${Math.random().toString(16).slice(2, 10)}`;
  await createThread(thread);
  const me = new DurableUserClient({ urls: PODS, token: TOKENS.alice });
  try {
    const inbox = await me.connect();
    assert.ok(inbox.threads.some((t) => t.id === thread));
    const ready = await me.join(thread);
    assert.equal(ready.thread_id, thread);
    const card = until(me, (e) => e.type === "thread" && e.thread.id === thread
      && e.thread.last_message?.role === "assistant", "the thread's card");
    const done = until(me, (e) => e.type === "done" && e.thread_id === thread, "the reply");
    me.prompt(thread, "hello over the user socket");
    const events = (await done).filter((e) => e.thread_id === thread && "id" in e);
    assert.deepEqual(events.map((e) => e.type).slice(0, 2), ["message", "loading"]);
    assert.equal(events.at(-1).status, "complete");
    await card;
  } finally {
    me.close();
  }
});

test("a dropped user socket resumes its joined thread exactly, on the next pod", { skip }, async () => {
  const thread = `user-drop-${Math.random().toString(16).slice(2, 10)}`;
  await createThread(thread);
  let deltas = 0;
  let dropped = false;
  class DroppingSocket extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols);
      this.addEventListener("message", (message) => {
        if (!dropped && JSON.parse(message.data).type === "delta" && ++deltas === 3) {
          dropped = true;
          this.close(4000, "dropped by the test");
        }
      });
    }
  }
  const me = new DurableUserClient({
    urls: PODS, token: TOKENS.alice, WebSocket: DroppingSocket, reconnectDelaysMs: [20],
  });
  try {
    await me.connect();
    await me.join(thread);
    const done = until(me, (e) => e.type === "done" && e.thread_id === thread, "the reply");
    me.prompt(thread, "keep going across the drop");
    const timeline = (await done).filter((e) => e.thread_id === thread && "id" in e);
    assert.ok(dropped && me.reconnects >= 1);
    for (let i = 1; i < timeline.length; i++) assert.equal(timeline[i].n, timeline[i - 1].n + 1);
    const text = timeline.filter((e) => e.type === "delta").map((e) => e.text).join("");
    assert.equal(text, timeline.at(-2).message.content);
  } finally {
    me.close();
  }
});
