// Generated from the server's pydantic models by `durable-chat schema typescript`.
// Do not edit: tests/test_schema.py fails when this file and the models differ.

export const PROTOCOL_VERSION = 1;

export interface LastMessageOut {
  id: string;
  role: string;
  user_id: string;
  preview: string;
  created_at: number;
}

/** A committed message of a thread's history, as clients see it. */
export interface Message {
  id: string;
  parent_id: string | null;
  role: "user" | "assistant";
  content: string;
  user_id: string;
  created_at: number;
  status: "complete" | "cancelled" | "interrupted" | "error";
  client_msg_id?: string | null;
  queue_id?: string | null;
  siblings?: Array<string> | null;
  tool_calls?: Array<ToolUse> | null;
  usage?: Usage | null;
}

/** A prompt waiting for the running turn (prompt_policy ``queue``). */
export interface QueuedPrompt {
  queue_id: string;
  user_id: string;
  content: string;
  client_msg_id?: string | null;
}

/** A thread as the caller's inbox shows it. */
export interface ThreadSummary {
  id: string;
  title: string;
  role: "owner" | "member" | "viewer";
  prompt_policy: string;
  generating: boolean;
  unread: number;
  updated_at: number;
  active_at: number;
  last_message: LastMessageOut | null;
  usage: TokenTotals;
}

export interface TokenTotals {
  input_tokens: number;
  output_tokens: number;
}

/** A tool the model called during a reply, with its result. */
export interface ToolUse {
  call_id: string;
  name: string;
  input: unknown;
  output: string;
  is_error: boolean;
  offset: number;
}

/** Why a turn ended ``error``: the model failed (``llm_error``). */
export interface TurnError {
  code: "llm_error";
  message: string;
  retryable: boolean;
}

/** Tokens a turn used: every input token read (cached ones included) and the output; the cache counts when the provider reported any. */
export interface Usage {
  input_tokens: number;
  output_tokens: number;
  cache_read_tokens?: number | null;
  cache_write_tokens?: number | null;
}

/** The thread's active leaf changed (a ``switch``). */
export interface BranchEvent {
  id: string;
  n: number;
  type: "branch";
  thread_id: string;
  leaf_id: string;
}

/** A piece of the reply: a generation's texts in ``seq`` order make its content. */
export interface DeltaEvent {
  id: string;
  n: number;
  type: "delta";
  thread_id: string;
  generation_id: string;
  seq: number;
  text: string;
}

/** A turn ended; ``message_id`` is the assistant message's id. */
export interface DoneEvent {
  id: string;
  n: number;
  type: "done";
  thread_id: string;
  generation_id: string;
  status: "complete" | "cancelled" | "interrupted" | "error";
  message_id: string;
  usage: Usage;
  error?: TurnError | null;
}

export interface ErrorEvent {
  type: "error";
  thread_id?: string | null;
  code: "bad_request" | "thread_busy" | "rate_limited" | "budget_exceeded" | "forbidden" | "not_found" | "queue_full" | "conflict" | "unavailable" | "internal" | "too_large" | "resume_gap" | "llm_error";
  message: string;
  retryable: boolean;
  retry_after_ms?: number | null;
}

export interface HistoryEvent {
  type: "history";
  thread_id: string;
  messages: Array<Message>;
  has_more: boolean;
}

/** The first event of a user socket: the caller's threads, most recently active first; ``next_cursor`` pages on with ``GET /v1/threads?cursor=``. */
export interface InboxEvent {
  type: "inbox";
  threads: Array<ThreadSummary>;
  next_cursor?: string | null;
}

/** A turn started: ``model`` is generating the reply ``generation_id``. */
export interface LoadingEvent {
  id: string;
  n: number;
  type: "loading";
  thread_id: string;
  generation_id: string;
  model: string;
}

/** A message committed to the thread's history (a user's or the assistant's). */
export interface MessageEvent {
  id: string;
  n: number;
  type: "message";
  thread_id: string;
  message: Message;
}

export interface PongEvent {
  type: "pong";
  thread_id?: string | null;
}

/** Who has a socket on the thread, on any pod (not a timeline event). */
export interface PresenceEvent {
  type: "presence";
  thread_id: string;
  users: Array<string>;
}

/** A prompt sent while a turn runs waits in the thread's queue; its ``queue_id`` is this event's id, and its ``message`` carries it once it runs. */
export interface QueuedEvent {
  id: string;
  n: number;
  type: "queued";
  thread_id: string;
  queue_id: string;
  user_id: string;
  content: string;
  client_msg_id?: string | null;
}

export interface ReadyEvent {
  type: "ready";
  thread_id: string;
  protocol: number;
  epoch: string;
  last_event_id: string | null;
  generating: boolean;
  generation_id: string | null;
  leaf_id: string | null;
  queue: Array<QueuedPrompt>;
  recovered?: boolean | null;
}

/** One of the caller's threads changed (or became theirs). */
export interface ThreadEvent {
  type: "thread";
  thread: ThreadSummary;
}

/** A thread left the caller's inbox. */
export interface ThreadRemovedEvent {
  type: "thread_removed";
  thread_id: string;
  reason: "deleted" | "revoked" | "left";
}

/** The model asked for a tool; it runs on the turn's pod after this event. */
export interface ToolCallEvent {
  id: string;
  n: number;
  type: "tool_call";
  thread_id: string;
  generation_id: string;
  call_id: string;
  name: string;
  input: unknown;
}

/** What the tool of ``call_id`` answered (``is_error``: a failure the model reads). */
export interface ToolResultEvent {
  id: string;
  n: number;
  type: "tool_result";
  thread_id: string;
  generation_id: string;
  call_id: string;
  output: string;
  is_error: boolean;
}

/** Another socket's user is typing in the thread (not a timeline event). */
export interface TypingEvent {
  type: "typing";
  thread_id: string;
  user_id: string;
}

/** A waiting prompt left the queue without running (``reason``: cancelled; budget_exceeded: its sender spent the day's tokens before it started; revoked: its sender is no longer a member of the thread). */
export interface UnqueuedEvent {
  id: string;
  n: number;
  type: "unqueued";
  thread_id: string;
  queue_id: string;
  reason: string;
}

/** Without ``parent_id`` the message follows the active leaf; with it (a message id, or null for a new root) it starts a branch there: an edit. */
export interface PromptFrame {
  thread_id?: string | null;
  type: "prompt";
  content: string;
  client_msg_id?: string | null;
  parent_id?: string | null;
}

export interface RegenerateFrame {
  thread_id?: string | null;
  type: "regenerate";
  message_id: string;
  client_msg_id?: string | null;
}

export interface SwitchFrame {
  thread_id?: string | null;
  type: "switch";
  message_id: string;
}

export interface GetHistoryFrame {
  thread_id?: string | null;
  type: "get_history";
  before?: string | null;
  limit?: number;
  leaf?: string | null;
}

/** Stops the running turn (``generation_id``: only that one), or with ``queue_id`` takes a waiting prompt out of the queue. */
export interface CancelFrame {
  thread_id?: string | null;
  type: "cancel";
  generation_id?: string | null;
  queue_id?: string | null;
}

export interface ResumeFrame {
  thread_id?: string | null;
  type: "resume";
  after: string;
  epoch?: string | null;
}

export interface PingFrame {
  type: "ping";
}

/** The member read the thread up to ``message_id`` (either socket kind). */
export interface ReadFrame {
  thread_id?: string | null;
  type: "read";
  message_id: string;
}

/** The member is typing: the thread's other sockets get ``typing``. */
export interface TypingFrame {
  thread_id?: string | null;
  type: "typing";
}

/** User socket: follow a thread on this socket, as a thread socket would. */
export interface JoinFrame {
  type: "join";
  thread_id: string;
  after?: string | null;
  epoch?: string | null;
}

/** User socket: stop following a joined thread. */
export interface LeaveFrame {
  type: "leave";
  thread_id: string;
}

export type ServerEvent =
  | BranchEvent
  | DeltaEvent
  | DoneEvent
  | ErrorEvent
  | HistoryEvent
  | InboxEvent
  | LoadingEvent
  | MessageEvent
  | PongEvent
  | PresenceEvent
  | QueuedEvent
  | ReadyEvent
  | ThreadEvent
  | ThreadRemovedEvent
  | ToolCallEvent
  | ToolResultEvent
  | TypingEvent
  | UnqueuedEvent;

export type TimelineEvent =
  | BranchEvent
  | DeltaEvent
  | DoneEvent
  | LoadingEvent
  | MessageEvent
  | QueuedEvent
  | ToolCallEvent
  | ToolResultEvent
  | UnqueuedEvent;

export type ClientFrame =
  | PromptFrame
  | RegenerateFrame
  | SwitchFrame
  | GetHistoryFrame
  | CancelFrame
  | ResumeFrame
  | PingFrame
  | ReadFrame
  | TypingFrame
  | JoinFrame
  | LeaveFrame;

export type ErrorCode = "bad_request" | "thread_busy" | "rate_limited" | "budget_exceeded" | "forbidden" | "not_found" | "queue_full" | "conflict" | "unavailable" | "internal" | "too_large" | "resume_gap" | "llm_error";

export const TIMELINE_TYPES: ReadonlySet<string> = new Set(["branch", "delta", "done", "loading", "message", "queued", "tool_call", "tool_result", "unqueued"]);
