// DurableChatTransport under the real AI SDK: `AbstractChat` from the `ai`
// package (what useChat wraps) drives it against real pods (DC_PODS, from
// tests/integration/test_js_client.py).
import assert from "node:assert/strict";
import { test } from "node:test";

import { AbstractChat } from "ai";

import { DurableChatTransport } from "../dist/transport.js";

const PODS = (process.env.DC_PODS ?? "").split(",").filter(Boolean);
const TOKENS = JSON.parse(process.env.DC_TOKENS ?? "{}");
const skip = PODS.length < 2 ? "run by tests/integration/test_js_client.py" : false;
const WAIT_MS = 15000;

/** The state a UI framework keeps (React's useChat keeps it in a hook). */
class PlainState {
  status = "ready";
  error = undefined;
  messages = [];
  pushMessage = (message) => {
    this.messages = [...this.messages, message];
  };
  popMessage = () => {
    this.messages = this.messages.slice(0, -1);
  };
  replaceMessage = (index, message) => {
    this.messages = this.messages.map((m, i) => (i === index ? message : m));
  };
  snapshot = (thing) => structuredClone(thing);
}

class Chat extends AbstractChat {
  constructor(init) {
    super({ ...init, state: new PlainState() });
  }
}

function transport(pod) {
  return new DurableChatTransport({ urls: [pod], token: TOKENS.alice, reconnectDelaysMs: [20, 50] });
}

function threadId(prefix) {
  return `${prefix}-${Math.random().toString(16).slice(2, 10)}`;
}

const textOf = (message) => message.parts.filter((p) => p.type === "text").map((p) => p.text).join("");

/** Resolves once `predicate` holds of a client event. */
function until(client, predicate) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("timed out")), WAIT_MS);
    const off = client.on((event) => {
      if (predicate(event)) {
        clearTimeout(timer);
        off();
        resolve(event);
      }
    });
  });
}

async function historyOf(durable) {
  return (await durable.client(durable.threadOfTest).getHistory({ limit: 20 })).messages;
}

test("useChat's sendMessage streams a durable reply, ids and text as the server keeps them", {
  skip,
}, async () => {
  const id = threadId("aisdk");
  const durable = transport(PODS[0]);
  durable.threadOfTest = id;
  const chat = new Chat({ id, transport: durable });
  try {
    await chat.sendMessage({ text: "hello from the AI SDK" });
    assert.equal(chat.status, "ready");
    assert.equal(chat.error, undefined);
    const [user, assistant] = chat.messages;
    assert.equal(chat.messages.length, 2);
    assert.equal(textOf(user), "hello from the AI SDK");
    const stored = await historyOf(durable);
    assert.deepEqual(stored.map((m) => m.role), ["user", "assistant"]);
    assert.equal(stored[0].client_msg_id, user.id); // the UI id is the idempotency key
    assert.equal(textOf(assistant), stored[1].content);
    assert.equal(assistant.metadata.messageId, stored[1].id);
    assert.equal(assistant.metadata.threadId, id);
  } finally {
    durable.close();
  }
});

test("another tab resumes the running reply from its start (resumeStream), on another pod", {
  skip,
}, async () => {
  const id = threadId("aisdk-resume");
  const first = transport(PODS[0]);
  const second = transport(PODS[1]);
  const writer = new Chat({ id, transport: first });
  const reader = new Chat({ id, transport: second });
  try {
    const sending = writer.sendMessage({ text: "a reply worth resuming" });
    await until(first.client(id), (e) => e.type === "delta" && e.seq >= 2);
    await reader.resumeStream();
    await sending;
    const written = writer.messages.at(-1);
    const resumed = reader.messages.at(-1);
    assert.equal(resumed.role, "assistant");
    assert.ok(textOf(written).length > 0);
    assert.equal(textOf(resumed), textOf(written)); // nothing lost, nothing doubled
    assert.equal(resumed.id, written.id);
    // Nothing is running now: resuming finds no stream.
    const idle = new Chat({ id, transport: second });
    await idle.resumeStream();
    assert.equal(idle.messages.length, 0);
  } finally {
    first.close();
    second.close();
  }
});

test("stop() cancels the turn on the server, and regenerate() asks for a sibling reply", {
  skip,
}, async () => {
  const id = threadId("aisdk-stop");
  const durable = transport(PODS[1]);
  durable.threadOfTest = id;
  const chat = new Chat({ id, transport: durable });
  try {
    const sending = chat.sendMessage({ text: "stop me" });
    await until(durable.client(id), (e) => e.type === "delta");
    const done = until(durable.client(id), (e) => e.type === "done");
    await chat.stop();
    await sending;
    assert.equal((await done).status, "cancelled");
    assert.equal((await historyOf(durable))[1].status, "cancelled");

    await chat.regenerate();
    assert.equal(chat.status, "ready");
    assert.equal(chat.messages.length, 2);
    const stored = await historyOf(durable);
    const reply = stored.at(-1);
    assert.equal(reply.status, "complete");
    assert.equal(reply.siblings.length, 2); // the cancelled reply and the new one
    assert.equal(textOf(chat.messages[1]), reply.content);
  } finally {
    durable.close();
  }
});

test("a tool the server runs is a dynamic tool part, with the text around it", { skip }, async () => {
  const id = threadId("aisdk-tool");
  const durable = transport(PODS[0]);
  durable.threadOfTest = id;
  const chat = new Chat({ id, transport: durable });
  try {
    // The fake model calls the tool it is told to, with the arguments given.
    for (const [prompt, state] of [["/tool clock", "output-available"], ["/tool clock {bad", "output-error"]]) {
      await chat.sendMessage({ text: prompt });
      assert.equal(chat.error, undefined);
      const assistant = chat.messages.at(-1);
      const tools = assistant.parts.filter((p) => p.type === "dynamic-tool");
      assert.equal(tools.length, 1);
      assert.equal(tools[0].toolName, "clock");
      assert.equal(tools[0].state, state);
      const stored = (await historyOf(durable)).at(-1);
      const call = stored.tool_calls[0];
      assert.equal(call.call_id, tools[0].toolCallId);
      assert.equal(state === "output-error" ? tools[0].errorText : tools[0].output, call.output);
      assert.equal(textOf(assistant), stored.content);
    }
  } finally {
    durable.close();
  }
});
