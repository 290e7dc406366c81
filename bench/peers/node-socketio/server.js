// Peer: Socket.IO on Node with the official Redis adapter (@socket.io/redis-adapter).
//
// The textbook multi-process Socket.IO chat, as bench/peers/socketio_server.py
// is in Python: each client joins its thread's room; a `prompt` event starts a
// turn on the process that received it, and every frame of the turn is
// emitted to the room. The adapter sends the emit to the room's members on
// this process and publishes it (msgpack) on the room's channel, which every
// other process reads through its pattern subscription and emits to its own
// members of the room.
//
// The workload is bench/peers/common.py's, ported line for line: the fake
// model's reply (app/llm/fake.py's reply_tokens), the `[t=<emission time>]`
// stamp after each token, the same coalescing rule (a delta goes out when the
// buffered text reaches CHAT_DELTA_MAX_BYTES or its oldest token is
// CHAT_DELTA_WINDOW_MS old), the same frames. One difference is the API's:
// Socket.IO's emit returns nothing to wait for (the adapter's PUBLISH is not
// awaited), so a turn does not wait on Redis between frames as the Python
// peers do.
//
// Usage: node server.js --port P --redis URL (configured by the same CHAT_*
// variables as a pod). Client protocol (Engine.IO 4 over a WebSocket,
// /socket.io/?EIO=4&transport=websocket): 42["join","<thread>"] -> 42["ready",{...}];
// 42["prompt",{"thread","content"}]; frames arrive as 42["chat",{...}].
// Keep-alive: Engine.IO's ping every pingInterval: 25 s, its default, or
// BENCH_PING_INTERVAL_S (bench/peers/common.py).
"use strict";

const http = require("node:http");
const { randomBytes } = require("node:crypto");
const { performance } = require("node:perf_hooks");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");

const ECHO_WORDS = 8;
const ECHO_CHARS = 24;
const INTRO =
  "(fake model) You said: \u201c{echo}\u201d. This is durable-chat's built-in fake model, " +
  "not an AI: a canned reply, streamed word by word, the same for the same " +
  "prompt. Set ANTHROPIC_API_KEY for real answers. Counting on:";

function words(text) {
  return text.split(/\s+/).filter((w) => w.length > 0);
}

// app/llm/fake.py's reply_tokens: `tokens` words, each after the first with its leading space.
function replyTokens(prompt, tokens) {
  const said = words(prompt);
  let echo = said.slice(0, ECHO_WORDS).map((w) => w.slice(0, ECHO_CHARS)).join(" ");
  if (said.length > ECHO_WORDS) echo += " \u2026";
  const out = words(INTRO.replace("{echo}", echo || "(nothing)")).slice(0, tokens);
  const intro = out.length;
  for (let n = 1; n <= tokens - intro; n++) out.push(String(n));
  return out.map((w, i) => (i === 0 ? w : " " + w));
}

function config() {
  const env = process.env;
  return {
    tokens: Number(env.CHAT_FAKE_REPLY_TOKENS ?? "40"),
    delayMs: Number(env.CHAT_FAKE_TOKEN_DELAY_MS ?? "20"),
    windowMs: Number(env.CHAT_DELTA_WINDOW_MS ?? "25"),
    maxBytes: Number(env.CHAT_DELTA_MAX_BYTES ?? "2048"),
  };
}

// Wall-clock seconds with microseconds, as Python's time.time() stamps them.
const now = () => (performance.timeOrigin + performance.now()) / 1000;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function message(thread, body, createdAt) {
  const m = { id: `${createdAt}-0`, ...body, created_at: createdAt, status: "complete" };
  return { type: "message", thread_id: thread, message: m };
}

// The tokens of one reply, as the model yields them, read by the turn's loop.
class Inbox {
  constructor() {
    this.items = [];
    this.head = 0;
    this.wake = null;
  }
  put(item) {
    this.items.push(item);
    if (this.wake) this.wake();
  }
  // The next item, or undefined when `deadline` (performance.now() ms, or null: none) passes first.
  next(deadline) {
    if (this.head < this.items.length) return Promise.resolve(this.items[this.head++]);
    return new Promise((resolve) => {
      const timer =
        deadline === null ? null : setTimeout(() => done(undefined), deadline - performance.now());
      const done = (value) => {
        this.wake = null;
        if (timer) clearTimeout(timer);
        resolve(value);
      };
      this.wake = () => done(this.items[this.head++]);
    });
  }
}

async function produce(prompt, cfg, inbox, cancelled) {
  for (const piece of replyTokens(prompt, cfg.tokens)) {
    if (cfg.delayMs) await sleep(cfg.delayMs);
    if (cancelled.value) return;
    inbox.put(`${piece}[t=${now().toFixed(6)}]`);
  }
  inbox.put(null);
}

// bench/peers/common.py's run_turn: one fake reply streamed to the room `thread`.
async function runTurn(io, thread, prompt, cfg) {
  const publish = (frame) => io.to(thread).emit("chat", frame);
  const generationId = randomBytes(8).toString("hex");
  const nowMs = Date.now();
  publish(message(thread, { role: "user", content: prompt, user_id: "anonymous" }, nowMs));
  publish({ type: "loading", thread_id: thread, generation_id: generationId, model: "fake" });
  const inbox = new Inbox();
  const cancelled = { value: false };
  const producer = produce(prompt, cfg, inbox, cancelled);
  let pending = [];
  let pendingBytes = 0;
  const published = [];
  let seq = 0;
  const flush = () => {
    if (!pending.length) return;
    const text = pending.join("");
    pending = [];
    pendingBytes = 0;
    publish({ type: "delta", thread_id: thread, generation_id: generationId, seq, text });
    published.push(text);
    seq += 1;
  };
  let deadline = null;
  try {
    for (;;) {
      if (deadline !== null && performance.now() >= deadline) {
        deadline = null;
        flush();
        continue;
      }
      const item = await inbox.next(deadline);
      if (item === undefined) continue; // the window closed first
      if (item === null) break;
      pending.push(item);
      pendingBytes += item.length;
      if (deadline === null) deadline = performance.now() + cfg.windowMs;
      if (pendingBytes >= cfg.maxBytes || cfg.windowMs === 0) {
        deadline = null;
        flush();
      }
    }
    flush();
  } finally {
    cancelled.value = true;
    await producer;
  }
  const reply = { role: "assistant", content: published.join(""), user_id: "assistant" };
  publish(message(thread, reply, Date.now()));
  publish({
    type: "done", thread_id: thread, generation_id: generationId, status: "complete",
    usage: { input_tokens: 1, output_tokens: cfg.tokens }, message_id: `${nowMs}-1`,
  });
}

function args() {
  const out = { port: 0, redis: "" };
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i += 2) {
    if (argv[i] === "--port") out.port = Number(argv[i + 1]);
    else if (argv[i] === "--redis") out.redis = argv[i + 1];
    else throw new Error(`unknown argument ${argv[i]} (usage: --port P --redis URL)`);
  }
  if (!out.port || !out.redis) throw new Error("usage: node server.js --port P --redis URL");
  return out;
}

async function main() {
  const { port, redis } = args();
  const cfg = config();
  const pubClient = createClient({ url: redis });
  const subClient = pubClient.duplicate();
  for (const client of [pubClient, subClient]) {
    client.on("error", (err) => console.error("redis:", err.message));
  }
  await Promise.all([pubClient.connect(), subClient.connect()]);
  const httpServer = http.createServer();
  const io = new Server(httpServer, {
    serveClient: false,
    adapter: createAdapter(pubClient, subClient),
    pingInterval: 1000 * Number(process.env.BENCH_PING_INTERVAL_S || 25),
  });
  io.on("connection", (socket) => {
    socket.on("join", (thread) => {
      socket.join(thread);
      socket.emit("ready", { type: "ready", thread_id: thread });
    });
    socket.on("prompt", (data) => {
      runTurn(io, data.thread, data.content, cfg).catch((err) => console.error("turn:", err));
    });
  });
  // Listening only once Redis answers: the benchmark waits for the port.
  httpServer.listen(port, "127.0.0.1");
  process.on("SIGTERM", () => process.exit(0));
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
