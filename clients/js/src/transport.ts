/**
 * `DurableChatTransport`: durable-chat behind the AI SDK's `useChat`.
 *
 *     import { useChat } from "@ai-sdk/react";
 *     import { DurableChatTransport } from "durable-chat-client/ai-sdk";
 *
 *     const transport = new DurableChatTransport({ urls: ["https://chat.example"], token });
 *     const { messages, sendMessage, stop, regenerate } = useChat({ id: threadId, transport, resume: true });
 *
 * The chat id is the thread id. Each chat gets one `DurableChatClient`, so the
 * stream survives pod restarts and network blips (exact resume), `stop()`
 * cancels the turn on whichever pod runs it, `regenerate()` asks the server for
 * a sibling reply, and `resume: true` picks up a reply that is still being
 * generated (after a reload, in another tab) from its start.
 *
 * Our events become UI message stream chunks: `loading` starts a message (its
 * id is the generation id) with a text part, each `delta` is a `text-delta`,
 * `tool_call` and `tool_result` are a dynamic tool part that the server ran
 * (`providerExecuted`; text after it is a new text part), and `done` finishes it (`stop`, or `interrupted` when its pod
 * died; a cancelled turn ends with `abort`). The assistant message's metadata
 * carries the durable ids: `{ threadId, generationId, messageId }`.
 *
 * Only types come from the `ai` package: at run time this module needs
 * nothing but the client.
 */

import type { ChatTransport, UIMessage, UIMessageChunk } from "ai";

import { type ClientOptions, DurableChatClient } from "./client.js";
import type { LoadingEvent, ServerEvent } from "./protocol.js";

export interface TransportOptions extends Omit<ClientOptions, "threadId"> {
  /** The thread of a chat (default: the chat id itself). */
  threadIdOf?: (chatId: string) => string;
}

/** What the transport puts in an assistant message's `metadata`. */
export interface DurableChatMetadata {
  threadId: string;
  generationId: string;
  /** The assistant message's id in the thread's history, once committed. */
  messageId?: string;
}

/** A turn as chunks so far, and who is reading it. */
interface Turn {
  generationId: string;
  chunks: UIMessageChunk[];
  finished: boolean;
  /** The text part being written, if any (a tool call closes it), and how many there were. */
  text: string | null;
  parts: number;
  readers: Set<ReadableStreamDefaultController<UIMessageChunk>>;
}

const SERVER_ID = /^[0-9]{1,20}-[0-9]{1,20}$/;

class ChatSession {
  readonly client: DurableChatClient;
  turn: Turn | null = null;
  /** Whether the thread runs a turn whose loading has not reached us yet. */
  generating = false;
  /** UI message ids (our client_msg_ids, or generation ids) to history ids. */
  readonly serverIds = new Map<string, string>();
  private connected: Promise<unknown> | null = null;
  private waiters: Array<(event: ServerEvent) => boolean> = [];

  constructor(client: DurableChatClient) {
    this.client = client;
    client.on((event) => this.observe(event));
  }

  connect(): Promise<unknown> {
    this.connected ??= this.client.connect();
    return this.connected;
  }

  /** Resolves with the first event that `accept` takes (it sees every event). */
  waitFor(accept: (event: ServerEvent) => boolean): void {
    this.waiters.push(accept);
  }

  private observe(event: ServerEvent): void {
    this.track(event);
    this.waiters = this.waiters.filter((accept) => !accept(event));
  }

  private track(event: ServerEvent): void {
    const turn = this.turn;
    switch (event.type) {
      case "ready":
        this.generating = event.generating;
        // Back, but what was missed cannot be had: the turn's end is unknown.
        if (event.recovered === false && turn && !turn.finished) {
          this.finish(turn, [{ type: "error", errorText: "the stream could not be resumed" }]);
        }
        break;
      case "message":
        if (event.message.client_msg_id) {
          this.serverIds.set(event.message.client_msg_id, event.message.id);
        }
        if (turn && event.message.role === "assistant" && event.message.parent_id) {
          this.serverIds.set(turn.generationId, event.message.id);
        }
        break;
      case "loading":
        this.generating = false;
        this.begin(event);
        break;
      case "delta":
        if (turn?.generationId === event.generation_id) {
          this.push(turn, { type: "text-delta", id: this.textPart(turn), delta: event.text });
        }
        break;
      case "tool_call":
        // The tool runs on the server: a dynamic, provider-executed tool part.
        if (turn?.generationId !== event.generation_id) break;
        this.closeText(turn);
        this.push(turn, {
          type: "tool-input-available", toolCallId: event.call_id, toolName: event.name,
          input: event.input, dynamic: true, providerExecuted: true,
        });
        break;
      case "tool_result":
        if (turn?.generationId !== event.generation_id) break;
        this.push(
          turn,
          event.is_error
            ? { type: "tool-output-error", toolCallId: event.call_id, errorText: event.output,
                dynamic: true, providerExecuted: true }
            : { type: "tool-output-available", toolCallId: event.call_id, output: event.output,
                dynamic: true, providerExecuted: true },
        );
        break;
      case "done": {
        if (turn?.generationId !== event.generation_id) break;
        this.serverIds.set(turn.generationId, event.message_id);
        const metadata: DurableChatMetadata = {
          threadId: this.client.threadId,
          generationId: event.generation_id,
          messageId: event.message_id,
        };
        this.closeText(turn);
        const end: UIMessageChunk[] = [{ type: "finish-step" }];
        if (event.status === "cancelled") end.push({ type: "abort", reason: "cancelled" });
        else if (event.status === "error") end.push({ type: "error", errorText: "the model failed" });
        else
          end.push({
            type: "finish",
            finishReason: event.status === "complete" ? "stop" : "interrupted",
            messageMetadata: metadata,
          });
        this.finish(turn, end);
        break;
      }
    }
  }

  private begin(event: LoadingEvent): void {
    const metadata: DurableChatMetadata = {
      threadId: this.client.threadId,
      generationId: event.generation_id,
    };
    const turn: Turn = {
      generationId: event.generation_id, chunks: [], finished: false, readers: new Set(),
      text: null, parts: 0,
    };
    this.turn = turn;
    this.push(turn, { type: "start", messageId: event.generation_id, messageMetadata: metadata });
    this.push(turn, { type: "start-step" });
    this.textPart(turn); // a reply that is only a tool call still has its (empty) text
  }

  /** The open text part's id, opening one (after a tool call) when none is. */
  private textPart(turn: Turn): string {
    if (turn.text === null) {
      turn.parts += 1;
      turn.text = turn.parts === 1 ? turn.generationId : `${turn.generationId}-${turn.parts}`;
      this.push(turn, { type: "text-start", id: turn.text });
    }
    return turn.text;
  }

  private closeText(turn: Turn): void {
    if (turn.text !== null) {
      this.push(turn, { type: "text-end", id: turn.text });
      turn.text = null;
    }
  }

  private push(turn: Turn, chunk: UIMessageChunk): void {
    turn.chunks.push(chunk);
    for (const reader of turn.readers) reader.enqueue(chunk);
  }

  private finish(turn: Turn, chunks: UIMessageChunk[]): void {
    for (const chunk of chunks) this.push(turn, chunk);
    turn.finished = true;
    for (const reader of turn.readers) reader.close();
    turn.readers.clear();
  }

  /** The chunks of `turn` from its start, then live, until it finishes. */
  stream(turn: Turn, abortSignal?: AbortSignal): ReadableStream<UIMessageChunk> {
    let me: ReadableStreamDefaultController<UIMessageChunk>;
    return new ReadableStream<UIMessageChunk>({
      start: (controller) => {
        me = controller;
        for (const chunk of turn.chunks) controller.enqueue(chunk);
        if (turn.finished) controller.close();
        else turn.readers.add(controller);
        abortSignal?.addEventListener("abort", () => {
          // `stop()`: end the turn wherever it runs; the reader is done now.
          if (!turn.finished) void this.client.cancel(turn.generationId);
          if (turn.readers.delete(me)) controller.close();
        });
      },
      cancel: () => {
        turn.readers.delete(me);
      },
    });
  }
}

export class DurableChatTransport<UI_MESSAGE extends UIMessage = UIMessage>
  implements ChatTransport<UI_MESSAGE>
{
  /** A resumed stream starts at the turn's beginning, not where the reader left. */
  readonly resumeStreamIsReplay = true;
  private readonly sessions = new Map<string, ChatSession>();

  constructor(private readonly options: TransportOptions) {}

  /** The client of a chat (to read its events, history or state yourself). */
  client(chatId: string): DurableChatClient {
    return this.session(chatId).client;
  }

  private session(chatId: string): ChatSession {
    let session = this.sessions.get(chatId);
    if (!session) {
      const threadId = this.options.threadIdOf?.(chatId) ?? chatId;
      session = new ChatSession(new DurableChatClient({ ...this.options, threadId }));
      this.sessions.set(chatId, session);
    }
    return session;
  }

  async sendMessages(
    options: Parameters<ChatTransport<UI_MESSAGE>["sendMessages"]>[0],
  ): Promise<ReadableStream<UIMessageChunk>> {
    const session = this.session(options.chatId);
    await session.connect();
    const started = new Promise<ReadableStream<UIMessageChunk>>((resolve, reject) => {
      let mine = options.trigger === "regenerate-message";
      let clientMsgId = "";
      const watch = (event: ServerEvent): boolean => {
        if (event.type === "message" && event.message.client_msg_id === clientMsgId) mine = true;
        if (event.type === "loading" && mine && session.turn) {
          resolve(session.stream(session.turn, options.abortSignal));
          return true;
        }
        if (event.type === "error") {
          reject(new Error(`${event.code}: ${event.message}`));
          return true;
        }
        return false;
      };
      session.waitFor(watch);
      const send =
        options.trigger === "submit-message"
          ? this.prompt(session, options.messages).then((id) => {
              clientMsgId = id;
            })
          : this.regenerate(session, options.messages, options.messageId);
      send.catch(reject);
    });
    return started;
  }

  async reconnectToStream(
    options: Parameters<ChatTransport<UI_MESSAGE>["reconnectToStream"]>[0],
  ): Promise<ReadableStream<UIMessageChunk> | null> {
    const session = this.session(options.chatId);
    await session.connect();
    const turn = session.turn;
    if (turn && !turn.finished) return session.stream(turn, options.abortSignal);
    if (!session.generating) return null;
    // The replay of the running turn is on its way: wait for its loading.
    return new Promise((resolve) =>
      session.waitFor((event) => {
        if (event.type === "loading" && session.turn) {
          resolve(session.stream(session.turn, options.abortSignal));
          return true;
        }
        return false;
      }),
    );
  }

  close(): void {
    for (const session of this.sessions.values()) session.client.close();
    this.sessions.clear();
  }

  private async prompt(session: ChatSession, messages: UI_MESSAGE[]): Promise<string> {
    const last = messages.at(-1);
    if (!last || last.role !== "user") throw new Error("the last message must be the user's");
    // The UI message's id is the idempotency key: a retried send appends nothing.
    const content = textOf(last);
    return session.client.prompt(content, { clientMsgId: last.id.slice(0, 64) });
  }

  private async regenerate(
    session: ChatSession,
    messages: UI_MESSAGE[],
    messageId: string | undefined,
  ): Promise<void> {
    // The server answers again the user message that `messageId` answered (or
    // the last user message): by their ids in the thread's history.
    const lastUser = messages.filter((m) => m.role === "user").at(-1)?.id;
    for (const id of [messageId, lastUser]) {
      const known = id && (session.serverIds.get(id) ?? (SERVER_ID.test(id) ? id : undefined));
      if (known) {
        await session.client.regenerate(known);
        return;
      }
    }
    throw new Error("regenerate: no message of this thread to answer again");
  }
}

function textOf(message: UIMessage): string {
  return message.parts
    .map((part) => (part.type === "text" ? part.text : ""))
    .join("")
    .trim();
}
