/**
 * A client of one durable-chat thread that never loses an event.
 *
 *     const chat = new DurableChatClient({ urls: ["https://a.example", "https://b.example"],
 *                                          threadId: "my-thread", token });
 *     chat.on((event) => { if (event.type === "delta") render(event.text); });
 *     await chat.connect();
 *     await chat.prompt("Hello");
 *
 * What it does for you, as the protocol asks of a client (the Python client,
 * app/client.py, does the same):
 * - keeps the id of the last timeline event and the thread's epoch, and when
 *   the connection drops (a pod restarting, a slow client cut off, a network
 *   blip) reconnects, to the next URL of the list, with `after` and `epoch`,
 *   backing off: nothing is missed, nothing repeats;
 * - gives every prompt a `client_msg_id` and sends it again after a reconnect
 *   until its own `message` event came back (the server appends it once);
 * - hands you `ready` events too: `recovered: false` means the history must be
 *   reloaded (`getHistory()`);
 * - when a WebSocket cannot be opened (a proxy that breaks them, or a runtime
 *   without one), uses the same thread over Server-Sent Events and HTTP posts.
 *
 * It needs nothing but the platform's `WebSocket` and `fetch` (browsers, Node >= 20).
 */
/** The connection ended for good: retrying cannot help (auth, bad thread id, deleted thread). */
export class ChatClosedError extends Error {
    final;
    code;
    constructor(message, final, code) {
        super(message);
        this.final = final;
        this.code = code;
        this.name = "ChatClosedError";
    }
}
/** Close codes after which reconnecting cannot help (PROTOCOL.md "Close codes"). */
const FINAL_CLOSE = new Set([1000, 1008]);
/** Errors that refuse the oldest waiting prompt outright: the caller's to resend. */
const PROMPT_REFUSALS = new Set([
    "thread_busy",
    "too_large",
    "bad_request",
    "rate_limited",
    "forbidden",
]);
const SUBPROTOCOL = "durable-chat.v1";
/** An event id `<ms>-<seq>` as a comparable pair. */
export function eventKey(id) {
    const [ms, seq] = id.split("-");
    return [BigInt(ms ?? "0"), BigInt(seq ?? "0")];
}
export function compareIds(a, b) {
    const [am, as] = eventKey(a);
    const [bm, bs] = eventKey(b);
    return am !== bm ? (am < bm ? -1 : 1) : as === bs ? 0 : as < bs ? -1 : 1;
}
function randomId() {
    const bytes = new Uint8Array(8);
    globalThis.crypto.getRandomValues(bytes);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}
/**
 * What a client remembers of one thread to resume it exactly: the last
 * timeline event delivered, the thread's epoch, and the prompts sent but not
 * yet seen back (oldest first), to send again after a reconnect.
 */
export class ThreadCursor {
    lastEventId = null;
    epoch = null;
    /** A `ready` was seen (so a later one is a reconnect). */
    joined = false;
    unconfirmed = new Map();
    /** Track position and prompts; false for an event already delivered. */
    observe(event) {
        if ("id" in event && "n" in event) {
            // A timeline event (only they carry an id and a number).
            if (this.lastEventId !== null && compareIds(event.id, this.lastEventId) <= 0) {
                // The original `message` of a prompt sent again after a reconnect: it
                // confirms the prompt, but the caller has seen it already.
                if (event.type === "message")
                    this.unconfirmed.delete(event.message.client_msg_id ?? "");
                return false;
            }
            this.lastEventId = event.id;
        }
        if (event.type === "ready") {
            this.epoch = event.epoch;
            if (this.joined && this.lastEventId === null && event.last_event_id) {
                // Back after a drop without having seen any event (we joined a thread
                // that had none): what happened meanwhile cannot be had. Say so.
                event.recovered = false;
            }
            if (event.recovered === false || (this.lastEventId === null && !event.generating)) {
                // Resume impossible (data trimmed or lost): restart from now. Or a first
                // join of an idle thread: every later event reaches us, so a reconnect
                // resumes from here.
                this.lastEventId = event.last_event_id;
            }
            this.joined = true;
        }
        else if (event.type === "message") {
            this.unconfirmed.delete(event.message.client_msg_id ?? "");
        }
        else if (event.type === "queued") {
            // Accepted into the thread's queue: it will run, on whichever pod frees the thread.
            this.unconfirmed.delete(event.client_msg_id ?? "");
        }
        else if (event.type === "error" &&
            PROMPT_REFUSALS.has(event.code) &&
            this.unconfirmed.size > 0) {
            // Frames are answered in order: this refusal answers the oldest prompt waiting.
            this.unconfirmed.delete(this.unconfirmed.keys().next().value);
        }
        return true;
    }
}
/** A WebSocket that never opened (a proxy that breaks them, or a dead pod). */
class NoWebSocket extends Error {
}
export class DurableChatClient {
    options;
    threadId;
    /** Where the client stands in the thread (its resume position). */
    cursor = new ThreadCursor();
    /** Successful reconnects so far. */
    reconnects = 0;
    state = "idle";
    urls;
    urlIndex = 0;
    opts;
    WS;
    fetchFn;
    mode;
    /** In `auto`: until when (ms since the epoch) reconnects use SSE after a WebSocket failed. */
    sseUntil = 0;
    link = null;
    listeners = new Set();
    stateListeners = new Set();
    closed = false;
    failures = 0;
    historyWaiters = [];
    readyWaiters = [];
    reconnectTimer = null;
    attempt = 0;
    constructor(options) {
        this.options = options;
        this.urls = (typeof options.urls === "string" ? [options.urls] : options.urls).map((u) => u.replace(/\/+$/, ""));
        if (this.urls.length === 0)
            throw new TypeError("urls: at least one base URL");
        this.threadId = options.threadId;
        this.opts = {
            reconnectDelaysMs: options.reconnectDelaysMs ?? [50, 100, 250, 500, 1000, 2000, 5000],
            maxReconnects: options.maxReconnects ?? 50,
            openTimeoutMs: options.openTimeoutMs ?? 10000,
            webSocketRetryMs: options.webSocketRetryMs ?? 60000,
        };
        const platformWS = globalThis.WebSocket ?? null;
        this.WS = options.WebSocket === undefined ? platformWS : options.WebSocket;
        const platformFetch = options.fetch ?? globalThis.fetch;
        this.fetchFn = platformFetch.bind(globalThis);
        this.mode = options.transport ?? "auto";
        if (this.mode !== "sse" && this.WS === null) {
            if (this.mode === "websocket")
                throw new TypeError("no WebSocket in this runtime");
            this.mode = "sse";
        }
    }
    /** The id of the last timeline event delivered (set it to resume from there). */
    get lastEventId() {
        return this.cursor.lastEventId;
    }
    set lastEventId(id) {
        this.cursor.lastEventId = id;
    }
    /** The thread's epoch, from `ready`. */
    get epoch() {
        return this.cursor.epoch;
    }
    set epoch(epoch) {
        this.cursor.epoch = epoch;
    }
    /** The transport in use (or to be used next). */
    get transport() {
        const onSse = this.mode === "sse" || (this.mode === "auto" && Date.now() < this.sseUntil);
        return this.link?.transport ?? (onSse ? "sse" : "websocket");
    }
    /** Call `listener` with every event, in order, across reconnects; returns an unsubscribe. */
    on(listener) {
        this.listeners.add(listener);
        return () => this.listeners.delete(listener);
    }
    onStateChange(listener) {
        this.stateListeners.add(listener);
        return () => this.stateListeners.delete(listener);
    }
    /** Every event from now on, as an async iterator (ends when the client closes). */
    async *events() {
        const queue = [];
        let wake = null;
        const off = this.on((event) => {
            queue.push(event);
            wake?.();
        });
        const offState = this.onStateChange(() => wake?.());
        try {
            while (true) {
                while (queue.length > 0)
                    yield queue.shift();
                if (this.closed)
                    return;
                await new Promise((resolve) => (wake = resolve));
                wake = null;
            }
        }
        finally {
            off();
            offState();
        }
    }
    /** Join the thread; resolves with the first `ready` (rejects if it cannot be reached). */
    connect() {
        if (this.closed)
            return Promise.reject(new ChatClosedError("client closed", true));
        const ready = new Promise((resolve, reject) => this.readyWaiters.push({ resolve, reject }));
        if (this.state === "idle")
            void this.open();
        return ready;
    }
    /** Send a prompt; resolves with its `client_msg_id` once sent. It is sent again after
     * a reconnect until its `message` event is seen; refusals arrive as `error` events.
     * With `parentId` (a message id, or null for a new root) it starts a branch there:
     * that is how a message is edited. */
    async prompt(content, options = {}) {
        const clientMsgId = options.clientMsgId ?? randomId();
        const frame = { type: "prompt", content, client_msg_id: clientMsgId };
        if (options.parentId !== undefined)
            frame.parent_id = options.parentId;
        this.cursor.unconfirmed.set(clientMsgId, frame);
        await this.send(frame);
        return clientMsgId;
    }
    /** Another reply to the user message `messageId` answers (or to it, if it is one),
     * a sibling of the old reply: `loading`, `delta`*, `message`, `done` follow. */
    async regenerate(messageId, options = {}) {
        const clientMsgId = options.clientMsgId ?? randomId();
        await this.send({ type: "regenerate", message_id: messageId, client_msg_id: clientMsgId });
        return clientMsgId;
    }
    /** Show the branch under `messageId` (its newest leaf): every client gets `branch`.
     * Needs a WebSocket (the HTTP API has no switch). */
    async switchBranch(messageId) {
        if (this.transport === "sse")
            throw new Error("switchBranch needs a WebSocket");
        await this.send({ type: "switch", message_id: messageId });
    }
    /** Stop the thread's running turn (or only `generationId`), wherever it runs. */
    async cancel(generationId) {
        await this.send(generationId ? { type: "cancel", generation_id: generationId } : { type: "cancel" });
    }
    /** Take a waiting prompt (`queued` event's `queue_id`) out of the thread's queue:
     * its sender or the thread's owner; every client gets `unqueued`. */
    async cancelQueued(queueId) {
        await this.send({ type: "cancel", queue_id: queueId });
    }
    /** A page of history: the `limit` messages before `before` (default: the latest)
     * on the branch that ends at `leaf` (default: the active one). */
    async getHistory(options = {}) {
        const answer = new Promise((resolve) => this.historyWaiters.push(resolve));
        const frame = { type: "get_history", limit: options.limit ?? 50 };
        if (options.before)
            frame.before = options.before;
        if (options.leaf)
            frame.leaf = options.leaf;
        await this.send(frame);
        return answer;
    }
    async ping() {
        await this.send({ type: "ping" });
    }
    /** Tell the thread's other users this one is typing: they get `typing`
     * (the server passes at most one per user per 2 s; over SSE it is dropped). */
    async typing() {
        await this.send({ type: "typing" });
    }
    /** The read marker: this user read the thread up to `messageId` (every
     * socket of theirs learns the new unread count). */
    async read(messageId) {
        await this.send({ type: "read", message_id: messageId });
    }
    close() {
        this.closed = true;
        if (this.reconnectTimer)
            clearTimeout(this.reconnectTimer);
        this.link?.close();
        this.link = null;
        this.setState("closed");
        this.failWaiters(new ChatClosedError("client closed", true));
    }
    // --- connecting ------------------------------------------------------------
    async send(frame) {
        if (this.closed)
            throw new ChatClosedError("client closed", true);
        if (this.state === "idle")
            void this.open();
        if (this.link === null) {
            await this.nextReady();
            // Prompts are re-sent by the reconnect itself; other frames are sent now.
            if (frame.type === "prompt")
                return;
        }
        try {
            await this.link.send(frame);
        }
        catch {
            // Lost with the connection: prompts go again after the reconnect; other
            // frames are cheap for the caller to send again.
        }
    }
    nextReady() {
        return new Promise((resolve, reject) => this.readyWaiters.push({ resolve, reject }));
    }
    async open() {
        if (this.closed)
            return;
        this.setState(this.cursor.joined ? "reconnecting" : "connecting");
        const base = this.urls[this.urlIndex % this.urls.length];
        const attempt = ++this.attempt;
        try {
            let link;
            if (this.mode === "sse" || (this.mode === "auto" && Date.now() < this.sseUntil)) {
                link = await this.openSse(base, attempt);
            }
            else {
                try {
                    link = await this.openWebSocket(base, attempt);
                }
                catch (error) {
                    if (this.mode === "websocket" || !(error instanceof NoWebSocket))
                        throw error;
                    // A WebSocket could not be opened here: the same thread over SSE + HTTP.
                    // Reconnects stay on SSE for a while (a proxy that breaks sockets
                    // breaks them all), then try a WebSocket again: the failure may as
                    // well have been a pod going away mid-rollout.
                    link = await this.openSse(base, attempt);
                    this.sseUntil = Date.now() + this.opts.webSocketRetryMs;
                }
            }
            if (attempt !== this.attempt || this.closed) {
                link.close();
                return;
            }
            this.link = link;
        }
        catch (error) {
            if (attempt !== this.attempt)
                return;
            this.dropped(error);
        }
    }
    async token() {
        const { token } = this.options;
        return typeof token === "function" ? await token() : token;
    }
    query() {
        const params = new URLSearchParams();
        if (this.lastEventId !== null) {
            params.set("after", this.lastEventId);
            if (this.epoch !== null)
                params.set("epoch", this.epoch);
        }
        const text = params.toString();
        return text ? `?${text}` : "";
    }
    threadPath() {
        return `/v1/threads/${encodeURIComponent(this.threadId)}`;
    }
    openWebSocket(base, attempt) {
        const WS = this.WS;
        const url = base.replace(/^http/, "ws") + `${this.threadPath()}/ws${this.query()}`;
        return this.token().then((token) => new Promise((resolve, reject) => {
            // Browsers cannot set headers on a WebSocket: the token rides in the
            // subprotocol list (never echoed back, never in a URL that is logged).
            const protocols = token ? [SUBPROTOCOL, `bearer.${token}`] : [SUBPROTOCOL];
            const ws = new WS(url, protocols);
            let opened = false;
            let readySeen = false;
            const timer = setTimeout(() => {
                ws.close();
                reject(opened ? new Error("no ready in time") : new NoWebSocket("WebSocket open timed out"));
            }, this.opts.openTimeoutMs);
            const link = {
                transport: "websocket",
                send: async (frame) => {
                    if (ws.readyState !== WS.OPEN)
                        throw new Error("socket not open");
                    ws.send(JSON.stringify(frame));
                },
                close: () => ws.close(1000),
            };
            ws.onopen = () => {
                opened = true;
            };
            ws.onmessage = (message) => {
                if (typeof message.data !== "string")
                    return;
                const event = JSON.parse(message.data);
                if (!readySeen) {
                    readySeen = true;
                    clearTimeout(timer);
                    resolve(link);
                }
                if (attempt === this.attempt)
                    this.receive(event, link);
            };
            ws.onclose = (close) => {
                clearTimeout(timer);
                if (!readySeen) {
                    const final = opened && FINAL_CLOSE.has(close.code);
                    const why = `closed with ${close.code}${close.reason ? `: ${close.reason}` : ""}`;
                    reject(opened ? new ChatClosedError(why, final, close.code) : new NoWebSocket(why));
                    return;
                }
                if (attempt !== this.attempt || this.closed)
                    return;
                const final = FINAL_CLOSE.has(close.code);
                this.dropped(new ChatClosedError(`closed by the server with ${close.code}`, final, close.code));
            };
        }));
    }
    async openSse(base, attempt) {
        const http = base.replace(/^ws/, "http");
        const token = await this.token();
        const auth = token ? { authorization: `Bearer ${token}` } : {};
        const controller = new AbortController();
        const timer = setTimeout(() => controller.abort(), this.opts.openTimeoutMs);
        let response;
        try {
            response = await this.fetchFn(`${http}${this.threadPath()}/events${this.query()}`, {
                headers: { accept: "text/event-stream", ...auth },
                signal: controller.signal,
                cache: "no-store",
            });
        }
        finally {
            clearTimeout(timer);
        }
        if (!response.ok || response.body === null) {
            const body = await response.text().catch(() => "");
            // Over its limits or unavailable: try again later; anything else is final.
            const final = ![429, 502, 503, 504].includes(response.status);
            throw new ChatClosedError(`HTTP ${response.status}: ${body}`, final, response.status);
        }
        const link = {
            transport: "sse",
            send: (frame) => this.post(http, auth, frame),
            close: () => controller.abort(),
        };
        const reader = readSse(response.body);
        const first = await reader.next();
        if (first.done)
            throw new Error("the event stream ended before ready");
        void (async () => {
            this.receive(first.value, link);
            try {
                for (let next = await reader.next(); !next.done; next = await reader.next()) {
                    if (attempt !== this.attempt)
                        return;
                    this.receive(next.value, link);
                }
                throw new Error("the event stream ended");
            }
            catch (error) {
                if (attempt === this.attempt && !this.closed)
                    this.dropped(error);
            }
        })();
        return link;
    }
    /** A frame as an HTTP request (the SSE transport); answers become events. */
    async post(http, auth, frame) {
        const path = `${http}${this.threadPath()}`;
        const json = { ...auth, "content-type": "application/json" };
        let response;
        if (frame.type === "prompt" || frame.type === "regenerate") {
            const { type, ...fields } = frame;
            const url = `${path}/${type === "prompt" ? "messages" : "regenerate"}`;
            response = await this.fetchFn(url, { method: "POST", headers: json, body: JSON.stringify(fields) });
        }
        else if (frame.type === "cancel") {
            const { type: _, ...fields } = frame; // generation_id or queue_id, if any
            const body = JSON.stringify(fields);
            response = await this.fetchFn(`${path}/cancel`, { method: "POST", headers: json, body });
        }
        else if (frame.type === "get_history") {
            const query = new URLSearchParams({ limit: String(frame.limit ?? 50) });
            if (frame.before)
                query.set("before", frame.before);
            if (frame.leaf)
                query.set("leaf", frame.leaf);
            response = await this.fetchFn(`${path}/messages?${query}`, { headers: auth });
        }
        else if (frame.type === "ping") {
            this.receive({ type: "pong", thread_id: this.threadId }, this.link);
            return;
        }
        else {
            return; // resume: the stream itself resumes; switch: no HTTP request
        }
        const body = (await response.json().catch(() => ({})));
        if (!response.ok) {
            const error = (body.error ?? {});
            const event = {
                type: "error",
                thread_id: this.threadId,
                code: error.code ?? "internal",
                message: error.message ?? `HTTP ${response.status}`,
                retryable: response.status === 409 || response.status === 429 || response.status >= 500,
            };
            if (error.retry_after_ms !== undefined)
                event.retry_after_ms = error.retry_after_ms;
            this.receive(event, this.link);
        }
        else if (frame.type !== "cancel") {
            // The prompt's message event, the regenerate's loading or a history page,
            // as a socket would get them; a timeline event comes on the stream too,
            // and is delivered once.
            this.receive(body, this.link);
        }
    }
    dropped(error) {
        this.link = null;
        if (this.closed)
            return;
        if (error instanceof ChatClosedError && error.final) {
            this.closed = true;
            this.setState("closed");
            this.failWaiters(error);
            return;
        }
        if (this.failures >= this.opts.maxReconnects) {
            this.closed = true;
            this.setState("closed");
            this.failWaiters(new ChatClosedError(`could not reconnect: ${String(error)}`, false));
            return;
        }
        const delays = this.opts.reconnectDelaysMs;
        const delay = delays[Math.min(this.failures, delays.length - 1)] ?? 1000;
        this.failures += 1;
        this.urlIndex += 1; // the next pod in the list
        this.setState(this.cursor.joined ? "reconnecting" : "connecting");
        this.reconnectTimer = setTimeout(() => {
            this.reconnectTimer = null;
            void this.open();
        }, delay);
    }
    // --- events ----------------------------------------------------------------
    receive(event, link) {
        const rejoined = this.cursor.joined;
        if (!this.cursor.observe(event))
            return;
        if (event.type === "ready") {
            this.link = link;
            if (rejoined)
                this.reconnects += this.failures > 0 ? 1 : 0;
            this.failures = 0;
            this.setState("live");
        }
        for (const listener of [...this.listeners])
            listener(event);
        if (event.type === "ready") {
            const waiters = this.readyWaiters;
            this.readyWaiters = [];
            for (const waiter of waiters)
                waiter.resolve(event);
            // Prompts not seen back yet go again, with the same client_msg_id.
            for (const frame of this.cursor.unconfirmed.values())
                void link?.send(frame).catch(() => undefined);
        }
        else if (event.type === "history") {
            this.historyWaiters.shift()?.(event);
        }
    }
    setState(state) {
        if (this.state === state)
            return;
        this.state = state;
        for (const listener of [...this.stateListeners])
            listener(state);
    }
    failWaiters(error) {
        const waiters = this.readyWaiters;
        this.readyWaiters = [];
        for (const waiter of waiters)
            waiter.reject(error);
    }
}
/** The events of a `text/event-stream` body (only `data:` matters: frames carry their id). */
export async function* readSse(body) {
    const decoder = new TextDecoder();
    const reader = body.getReader();
    let buffer = "";
    let data = [];
    try {
        while (true) {
            const { value, done } = await reader.read();
            if (done)
                return;
            buffer += decoder.decode(value, { stream: true });
            let newline;
            while ((newline = buffer.indexOf("\n")) >= 0) {
                const line = buffer.slice(0, newline).replace(/\r$/, "");
                buffer = buffer.slice(newline + 1);
                if (line === "") {
                    if (data.length > 0)
                        yield JSON.parse(data.join("\n"));
                    data = [];
                }
                else if (line.startsWith("data:")) {
                    data.push(line.slice(5).replace(/^ /, ""));
                }
            }
        }
    }
    finally {
        reader.releaseLock();
    }
}
