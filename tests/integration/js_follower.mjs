// One TypeScript client (clients/js, built into dist/) on one thread, for
// tests/integration/test_load_balancer.py, which reads what it prints:
//   {"event": {...}}       every event the client hands on, in order
//   {"sent": "<id>"}       a prompt's client_msg_id, as it is sent
//   {"reconnects": n, "transport": "websocket" | "sse"}   last, at the end
// Environment: DC_URL (the load balancer), DC_THREAD, and DC_WRITE=1 to send
// prompt after prompt, each once the turn of the one before is done.
// The end of its standard input stops it: a reader closes at once, a writer
// first sends one more prompt and waits for its turn to be done.
import { DurableChatClient } from "../../clients/js/dist/index.js";

const print = (line) => process.stdout.write(`${JSON.stringify(line)}\n`);

let stopping = false;
const stopped = new Promise((resolve) => {
  process.stdin.on("end", () => {
    stopping = true;
    resolve();
  });
  process.stdin.resume();
});

const chat = new DurableChatClient({
  urls: process.env.DC_URL,
  threadId: process.env.DC_THREAD,
  reconnectDelaysMs: [50, 100, 250, 500, 1000],
});

// The prompt whose turn is awaited: done once its own message was seen and
// then a `done` (one writer per thread, so that `done` is its turn's).
let awaited = null;
chat.on((event) => {
  print({ event });
  if (awaited === null) return;
  if (event.type === "message" && event.message.client_msg_id === awaited.id) awaited.seen = true;
  if (event.type === "done" && awaited.seen) awaited.resolve();
});

await chat.connect();
if (process.env.DC_WRITE === "1") {
  for (let n = 0, last = false; !last; n++) {
    last = stopping;
    const id = `js-${process.pid}-${n}`;
    const answered = new Promise((resolve) => {
      awaited = { id, seen: false, resolve };
    });
    print({ sent: id });
    await chat.prompt(`js prompt ${n}`, { clientMsgId: id });
    await answered;
  }
} else {
  await stopped;
}
print({ reconnects: chat.reconnects, transport: chat.transport });
chat.close();
