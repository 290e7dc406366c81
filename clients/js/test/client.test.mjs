// The TypeScript client against real pods and a real redis-server. Started by
// tests/integration/test_js_client.py, which passes the pods' addresses:
//   DC_PODS      comma-separated base URLs of the pods that stay up
//   DC_VICTIM    base URL of a pod this file may kill, DC_VICTIM_PID its process id
//   DC_TOKENS    JSON {user: jwt} for the pods' authentication
import assert from "node:assert/strict";
import { test } from "node:test";

import { DurableChatClient } from "../dist/index.js";

const PODS = (process.env.DC_PODS ?? "").split(",").filter(Boolean);
const TOKENS = JSON.parse(process.env.DC_TOKENS ?? "{}");
const skip = PODS.length < 2 ? "run by tests/integration/test_js_client.py" : false;
const WAIT_MS = 15000;

function threadId(prefix) {
  return `${prefix}-${Math.random().toString(16).slice(2, 10)}`;
}

function client(urls, threadIdValue, extra = {}) {
  return new DurableChatClient({
    urls,
    threadId: threadIdValue,
    token: TOKENS.alice,
    reconnectDelaysMs: [20, 50, 100],
    ...extra,
  });
}

/** Every event up to and including the first that `stop` accepts. */
function collect(chat, stop, label = "events") {
  const seen = [];
  return new Promise((resolve, reject) => {
    const timer = setTimeout(
      () => reject(new Error(`timed out waiting for ${label}: ${JSON.stringify(seen.map((e) => e.type))}`)),
      WAIT_MS,
    );
    const off = chat.on((event) => {
      seen.push(event);
      if (stop(event)) {
        clearTimeout(timer);
        off();
        resolve(seen);
      }
    });
  });
}

const isDone = (event) => event.type === "done";

/** Resolves once `predicate()` holds (polled); rejects after WAIT_MS. */
async function eventually(predicate, label) {
  const deadline = Date.now() + WAIT_MS;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${label}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/** A turn's checks: ids strictly increase, numbers are contiguous, and the
 * deltas in seq order make exactly the final message. */
function assertWholeTurn(events) {
  const timeline = events.filter((e) => "id" in e && "n" in e);
  for (let i = 1; i < timeline.length; i++) {
    assert.equal(timeline[i].n, timeline[i - 1].n + 1, "contiguous event numbers");
  }
  const deltas = timeline.filter((e) => e.type === "delta");
  assert.deepEqual(deltas.map((d) => d.seq), deltas.map((_, i) => i), "every delta once, in order");
  const final = timeline.filter((e) => e.type === "message").at(-1);
  assert.equal(final.message.role, "assistant");
  assert.equal(deltas.map((d) => d.text).join(""), final.message.content);
  assert.ok(final.message.content.length > 0);
  return final.message.content;
}

test("two clients on different pods stream the same reply over WebSockets", { skip }, async () => {
  const thread = threadId("ws");
  const a = client([PODS[0]], thread);
  const b = client([PODS[1]], thread);
  try {
    const readyA = await a.connect();
    assert.equal(readyA.protocol, 1);
    await b.connect();
    assert.equal(a.transport, "websocket");
    const onA = collect(a, isDone);
    const onB = collect(b, isDone);
    const clientMsgId = await a.prompt("hello from node");
    const [eventsA, eventsB] = await Promise.all([onA, onB]);
    const timelineA = eventsA.filter((e) => "id" in e);
    assert.deepEqual(eventsB.filter((e) => "id" in e), timelineA);
    assert.equal(timelineA[0].message.client_msg_id, clientMsgId);
    assertWholeTurn(eventsA);
    const page = await b.getHistory({ limit: 10 });
    assert.deepEqual(page.messages.map((m) => m.role), ["user", "assistant"]);
  } finally {
    a.close();
    b.close();
  }
});

test("a reply survives the death of its pod: the client resumes on the next one", {
  skip: skip || !process.env.DC_VICTIM,
}, async () => {
  const thread = threadId("kill");
  const chat = client([process.env.DC_VICTIM, PODS[0]], thread);
  const watcher = client([PODS[1]], thread);
  try {
    await chat.connect();
    await watcher.connect();
    const events = collect(chat, isDone, "the reply after the kill");
    const watched = collect(watcher, isDone);
    let killed = false;
    const offKill = chat.on((event) => {
      if (event.type === "delta" && event.seq === 2 && !killed) {
        killed = true;
        process.kill(Number(process.env.DC_VICTIM_PID), "SIGKILL");
      }
    });
    await chat.prompt("keep talking");
    const seen = await events;
    offKill();
    assert.ok(killed, "the pod was killed mid-reply");
    // A client slower than the pod (a loaded machine) may read the reply's
    // last frames, which the pod wrote before it died, before its socket's
    // close: either way it reconnects, to a pod that lives.
    await eventually(() => chat.reconnects >= 1 && chat.state === "live", "the reconnect");
    const text = assertWholeTurn(seen);
    // Nothing lost, nothing doubled: exactly what a client on a surviving pod saw.
    assert.deepEqual(
      seen.filter((e) => "id" in e).map((e) => e.id),
      (await watched).filter((e) => "id" in e).map((e) => e.id),
    );
    assert.ok(["complete", "interrupted"].includes(seen.at(-1).status));
    assert.ok(text.length > 0);
  } finally {
    chat.close();
    watcher.close();
  }
});

test("without a WebSocket the client uses SSE and HTTP: stream, history, cancel", { skip }, async () => {
  const thread = threadId("sse");
  const chat = client([PODS[0]], thread, { WebSocket: null });
  const other = client([PODS[1]], thread);
  try {
    await chat.connect();
    await other.connect();
    assert.equal(chat.transport, "sse");
    const onSse = collect(chat, isDone);
    const onWs = collect(other, isDone);
    await chat.prompt("over http");
    const [sse, ws] = await Promise.all([onSse, onWs]);
    // Each event once (the POST's answer and the stream's copy are one event).
    assert.deepEqual(sse.filter((e) => "id" in e), ws.filter((e) => "id" in e));
    assertWholeTurn(sse);
    const page = await chat.getHistory({ limit: 5 });
    assert.equal(page.messages.length, 2);
    // Cancel over HTTP stops a turn that runs on the other pod.
    const cancelled = collect(chat, isDone, "the cancelled turn");
    await other.prompt("a long one");
    await collect(chat, (e) => e.type === "delta");
    await chat.cancel();
    assert.equal((await cancelled).at(-1).status, "cancelled");
  } finally {
    chat.close();
    other.close();
  }
});

test("a proxy that breaks WebSockets: the client falls back to SSE by itself", { skip }, async () => {
  // A WebSocket whose upgrade always fails, as behind such a proxy.
  class BrokenSocket extends WebSocket {
    constructor(url, protocols) {
      super(url.replace(/\/ws(\?|$)/, "/no-such-socket$1"), protocols);
    }
  }
  const chat = client([PODS[1]], threadId("fallback"), { WebSocket: BrokenSocket });
  try {
    const ready = await chat.connect();
    assert.equal(ready.type, "ready");
    assert.equal(chat.transport, "sse");
    const events = collect(chat, isDone);
    await chat.prompt("through the proxy");
    assertWholeTurn(await events);
  } finally {
    chat.close();
  }
});

test("after a failed WebSocket the client tries one again on a later reconnect", { skip, timeout: 20000 }, async () => {
  // The first upgrade fails (a pod going away mid-rollout looks the same as a
  // proxy that breaks sockets); the next ones work.
  let upgrades = 0;
  class OnceBrokenSocket extends WebSocket {
    constructor(url, protocols) {
      upgrades += 1;
      super(upgrades === 1 ? url.replace(/\/ws(\?|$)/, "/no-such-socket$1") : url, protocols);
    }
  }
  // An event stream the test can cut, as a pod restart does.
  let cut = null;
  const cuttableFetch = async (url, init) => {
    const response = await fetch(url, init);
    if (!String(url).includes("/events") || response.body === null) return response;
    const upstream = response.body.getReader();
    const body = new ReadableStream({
      start(controller) {
        cut = () => {
          controller.error(new Error("cut by the test"));
          void upstream.cancel();
        };
      },
      async pull(controller) {
        const next = await upstream.read().catch(() => ({ done: true }));
        if (next.done) controller.close();
        else controller.enqueue(next.value);
      },
    });
    return new Response(body, { status: response.status, headers: response.headers });
  };
  const chat = client([PODS[1]], threadId("retryws"), {
    WebSocket: OnceBrokenSocket,
    fetch: cuttableFetch,
    webSocketRetryMs: 0,
  });
  try {
    await chat.connect();
    assert.equal(chat.transport, "sse");
    const first = collect(chat, isDone, "the turn over SSE");
    await chat.prompt("over sse");
    await first;
    const reconnected = new Promise((resolve) => {
      const off = chat.onStateChange((state) => {
        if (state === "live") {
          off();
          resolve();
        }
      });
    });
    cut();
    await reconnected;
    assert.equal(chat.transport, "websocket");
    assert.equal(upgrades, 2);
    const second = collect(chat, isDone, "the turn after the reconnect");
    await chat.prompt("over a websocket again");
    assertWholeTurn(await second);
  } finally {
    chat.close();
  }
});

test("a prompt lost with its connection is sent again after the reconnect, and kept once", {
  skip,
}, async () => {
  // The first connection drops as the prompt is sent: once before the frame
  // leaves, once right after it (the server has it; the client cannot know).
  for (const sentFirst of [false, true]) {
    let dropped = false;
    class DroppingSocket extends WebSocket {
      send(data) {
        if (!dropped && JSON.parse(data).type === "prompt") {
          dropped = true;
          if (sentFirst) super.send(data);
          this.close(4000, "dropped by the test");
          return;
        }
        super.send(data);
      }
    }
    const thread = threadId("resend");
    const chat = client(PODS, thread, { WebSocket: DroppingSocket });
    try {
      await chat.connect();
      // A first turn, so that the client has an event to resume after.
      const warm = collect(chat, isDone);
      dropped = true;
      await chat.prompt("warm up");
      await warm;
      dropped = false;
      const events = collect(chat, isDone);
      const clientMsgId = await chat.prompt("exactly once");
      const seen = await events;
      assert.ok(dropped && chat.reconnects >= 1);
      const mine = seen.filter((e) => e.type === "message" && e.message.role === "user");
      assert.equal(mine.length, 1);
      assert.equal(mine[0].message.client_msg_id, clientMsgId);
      assertWholeTurn(seen);
      const page = await chat.getHistory();
      const prompts = page.messages.filter((m) => m.role === "user").map((m) => m.content);
      assert.deepEqual(prompts, ["warm up", "exactly once"]);
    } finally {
      chat.close();
    }
  }
});

test("a resume that cannot be exact says recovered: false, and the client starts over from now", {
  skip,
}, async () => {
  const thread = threadId("gap");
  const first = client([PODS[0]], thread);
  await first.connect();
  const done = collect(first, isDone);
  await first.prompt("before");
  await done;
  first.close();
  for (const transport of ["websocket", "sse"]) {
    const chat = client([PODS[1]], thread, { transport });
    chat.lastEventId = "1-0";
    chat.epoch = "another-epoch";
    try {
      const ready = await chat.connect();
      assert.equal(ready.recovered, false);
      assert.equal(chat.lastEventId, ready.last_event_id);
      assert.equal((await chat.getHistory()).messages.length, 2);
    } finally {
      chat.close();
    }
  }
});

test("refusals are final: a stranger's token closes the client with an error", { skip }, async () => {
  const owner = client([PODS[0]], threadId("private"));
  await owner.connect();
  owner.close();
  for (const transport of ["websocket", "sse"]) {
    const stranger = client([PODS[1]], owner.threadId, { token: TOKENS.mallory, transport });
    await assert.rejects(stranger.connect(), (error) => error.final === true);
    assert.equal(stranger.state, "closed");
  }
});

test("a thread that queues: a prompt sent during a reply waits, and leaves the queue on cancel", {
  skip,
}, async () => {
  const thread = threadId("queue");
  const created = await fetch(`${PODS[0]}/v1/threads`, {
    method: "POST",
    headers: { authorization: `Bearer ${TOKENS.alice}`, "content-type": "application/json" },
    body: JSON.stringify({ id: thread }),
  });
  assert.equal(created.status, 201);
  const patched = await fetch(`${PODS[0]}/v1/threads/${thread}`, {
    method: "PATCH",
    headers: { authorization: `Bearer ${TOKENS.alice}`, "content-type": "application/json" },
    body: JSON.stringify({ prompt_policy: "queue" }),
  });
  assert.equal(patched.status, 200);
  for (const transport of ["websocket", "sse"]) {
    const chat = client([PODS[1]], thread, { transport });
    try {
      await chat.connect();
      const started = collect(chat, (e) => e.type === "delta", "the first reply");
      await chat.prompt("the first");
      await started;
      const queued = collect(chat, (e) => e.type === "queued", "the queued prompt");
      const clientMsgId = await chat.prompt("the second, while the first runs");
      const waiting = (await queued).at(-1);
      assert.equal(waiting.client_msg_id, clientMsgId);
      const unqueued = collect(chat, (e) => e.type === "unqueued", "the cancel of the queued prompt");
      await chat.cancelQueued(waiting.queue_id);
      const left = (await unqueued).at(-1);
      assert.deepEqual([left.queue_id, left.reason], [waiting.queue_id, "cancelled"]);
      await collect(chat, isDone, "the first reply's end");
    } finally {
      chat.close();
    }
  }
});
