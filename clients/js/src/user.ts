/**
 * `DurableUserClient`: the user socket (`GET /v1/ws`), one connection for a
 * user's inbox and any number of joined threads.
 *
 *     const me = new DurableUserClient({ urls: ["https://chat.example"], token });
 *     me.on((event) => { if (event.type === "thread") updateCard(event.thread); });
 *     const inbox = await me.connect();            // the inbox snapshot
 *     await me.join("my-thread");                   // its ready, then its timeline
 *     await me.prompt("my-thread", "Hello");
 *
 * Every joined thread is resumed exactly after a reconnect (each keeps its own
 * `ThreadCursor`: last event id, epoch, unconfirmed prompts), the inbox is a
 * fresh snapshot on every connect, and the same backoff and URL rotation as
 * the thread client apply. The user socket has no HTTP twin: it needs a
 * WebSocket.
 */

import { ChatClosedError, ThreadCursor } from "./client.js";
import type { ClientFrame, InboxEvent, ReadyEvent, ServerEvent } from "./protocol.js";

export interface UserClientOptions {
  /** Base URLs of the pods or of the load balancer, tried in turn. */
  urls: string | string[];
  /** A JWT, or a function that returns a fresh one for each connection. */
  token?: string | (() => string | Promise<string>);
  reconnectDelaysMs?: number[];
  maxReconnects?: number;
  WebSocket?: typeof WebSocket;
}

const FINAL_CLOSE = new Set([1000, 1008]);
const SUBPROTOCOL = "durable-chat.v1";

type Waiter<T> = { resolve: (value: T) => void; reject: (error: Error) => void };

export class DurableUserClient {
  /** Joined threads and where each stands. */
  readonly threads = new Map<string, ThreadCursor>();
  reconnects = 0;
  private readonly urls: string[];
  private urlIndex = 0;
  private readonly WS: typeof WebSocket;
  private ws: WebSocket | null = null;
  private readonly listeners = new Set<(event: ServerEvent) => void>();
  private inboxWaiters: Waiter<InboxEvent>[] = [];
  private readonly readyWaiters = new Map<string, Waiter<ReadyEvent>[]>();
  private failures = 0;
  private connected = false;
  private closed = false;

  constructor(private readonly options: UserClientOptions) {
    this.urls = (typeof options.urls === "string" ? [options.urls] : options.urls).map((u) =>
      u.replace(/\/+$/, ""),
    );
    const WS = options.WebSocket ?? (globalThis as { WebSocket?: typeof WebSocket }).WebSocket;
    if (!WS) throw new TypeError("the user socket needs a WebSocket");
    this.WS = WS;
  }

  /** Every event of the socket (inbox, thread cards, joined threads' events), in order. */
  on(listener: (event: ServerEvent) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /** Open the socket; resolves with the first inbox snapshot. */
  connect(): Promise<InboxEvent> {
    const inbox = new Promise<InboxEvent>((resolve, reject) =>
      this.inboxWaiters.push({ resolve, reject }),
    );
    if (!this.ws && !this.closed) void this.open();
    return inbox;
  }

  /** Follow a thread on this socket; resolves with its `ready`. */
  join(threadId: string): Promise<ReadyEvent> {
    const cursor = this.threads.get(threadId) ?? new ThreadCursor();
    this.threads.set(threadId, cursor);
    const ready = new Promise<ReadyEvent>((resolve, reject) => {
      const waiting = this.readyWaiters.get(threadId) ?? [];
      waiting.push({ resolve, reject });
      this.readyWaiters.set(threadId, waiting);
    });
    this.sendJoin(threadId, cursor);
    return ready;
  }

  leave(threadId: string): void {
    this.threads.delete(threadId);
    this.send({ type: "leave", thread_id: threadId });
  }

  /** A prompt to a joined thread; sent again after a reconnect until it is seen back. */
  prompt(
    threadId: string,
    content: string,
    options: { clientMsgId?: string; parentId?: string | null } = {},
  ): string {
    const cursor = this.joined(threadId);
    const clientMsgId = options.clientMsgId ?? globalThis.crypto.randomUUID();
    const frame: ClientFrame = {
      type: "prompt", thread_id: threadId, content, client_msg_id: clientMsgId,
    };
    if (options.parentId !== undefined) frame.parent_id = options.parentId;
    cursor.unconfirmed.set(clientMsgId, frame);
    this.send(frame);
    return clientMsgId;
  }

  cancel(threadId: string, generationId?: string): void {
    this.joined(threadId);
    this.send(generationId
      ? { type: "cancel", thread_id: threadId, generation_id: generationId }
      : { type: "cancel", thread_id: threadId });
  }

  regenerate(threadId: string, messageId: string): void {
    this.joined(threadId);
    this.send({ type: "regenerate", thread_id: threadId, message_id: messageId });
  }

  switchBranch(threadId: string, messageId: string): void {
    this.joined(threadId);
    this.send({ type: "switch", thread_id: threadId, message_id: messageId });
  }

  getHistory(threadId: string, options: { before?: string; limit?: number; leaf?: string } = {}): void {
    this.joined(threadId);
    this.send({ type: "get_history", thread_id: threadId, ...options });
  }

  /** The member read the thread up to `messageId`: every socket of theirs learns it. */
  read(threadId: string, messageId: string): void {
    this.send({ type: "read", thread_id: threadId, message_id: messageId });
  }

  /** The member is typing in a joined thread (the server keeps one per 2 s). */
  typing(threadId: string): void {
    this.joined(threadId);
    this.send({ type: "typing", thread_id: threadId });
  }

  close(): void {
    this.closed = true;
    this.ws?.close(1000);
    this.ws = null;
    this.fail(new ChatClosedError("client closed", true));
  }

  private joined(threadId: string): ThreadCursor {
    const cursor = this.threads.get(threadId);
    if (!cursor) throw new Error(`join ${threadId} first`);
    return cursor;
  }

  private sendJoin(threadId: string, cursor: ThreadCursor): void {
    const frame: ClientFrame = { type: "join", thread_id: threadId };
    if (cursor.lastEventId !== null) {
      frame.after = cursor.lastEventId;
      if (cursor.epoch !== null) frame.epoch = cursor.epoch;
    }
    this.send(frame);
  }

  private send(frame: ClientFrame): void {
    // Lost with the connection? Joins and prompts go again after the reconnect.
    if (this.connected && this.ws?.readyState === this.WS.OPEN) this.ws.send(JSON.stringify(frame));
  }

  private async open(): Promise<void> {
    const { token } = this.options;
    const jwt = typeof token === "function" ? await token() : token;
    const base = this.urls[this.urlIndex % this.urls.length]!.replace(/^http/, "ws");
    const ws = new this.WS(`${base}/v1/ws`, jwt ? [SUBPROTOCOL, `bearer.${jwt}`] : [SUBPROTOCOL]);
    this.ws = ws;
    let opened = false;
    ws.onopen = () => {
      opened = true;
    };
    ws.onmessage = (message) => {
      if (this.ws === ws && typeof message.data === "string") {
        this.receive(JSON.parse(message.data) as ServerEvent);
      }
    };
    ws.onclose = (close) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.connected = false;
      if (this.closed) return;
      if (opened && FINAL_CLOSE.has(close.code)) {
        this.closed = true;
        this.fail(new ChatClosedError(`closed by the server with ${close.code}`, true, close.code));
        return;
      }
      const maxReconnects = this.options.maxReconnects ?? 50;
      if (this.failures >= maxReconnects) {
        this.closed = true;
        this.fail(new ChatClosedError("could not reconnect", false));
        return;
      }
      const delays = this.options.reconnectDelaysMs ?? [50, 100, 250, 500, 1000, 2000, 5000];
      const delay = delays[Math.min(this.failures, delays.length - 1)] ?? 1000;
      this.failures += 1;
      this.urlIndex += 1;
      setTimeout(() => void this.open(), delay);
    };
  }

  private receive(event: ServerEvent): void {
    const threadId = "thread_id" in event ? event.thread_id : null;
    const cursor = threadId ? this.threads.get(threadId) : undefined;
    if (cursor && !cursor.observe(event)) return; // already delivered
    if (event.type === "inbox") {
      if (this.failures > 0) this.reconnects += 1;
      this.failures = 0;
      this.connected = true;
      // Back: every joined thread resumes after its last event.
      for (const [id, joined] of this.threads) this.sendJoin(id, joined);
    }
    for (const listener of [...this.listeners]) listener(event);
    if (event.type === "inbox") {
      const waiters = this.inboxWaiters;
      this.inboxWaiters = [];
      for (const waiter of waiters) waiter.resolve(event);
    } else if (event.type === "ready" && cursor) {
      const waiters = this.readyWaiters.get(event.thread_id) ?? [];
      this.readyWaiters.delete(event.thread_id);
      for (const waiter of waiters) waiter.resolve(event);
      for (const frame of cursor.unconfirmed.values()) this.send(frame);
    }
  }

  private fail(error: Error): void {
    for (const waiter of this.inboxWaiters) waiter.reject(error);
    this.inboxWaiters = [];
    for (const waiters of this.readyWaiters.values()) for (const w of waiters) w.reject(error);
    this.readyWaiters.clear();
  }
}
