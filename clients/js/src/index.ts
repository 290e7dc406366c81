/** durable-chat-client: the thread client and the generated protocol types. */
export * from "./client.js";
export * from "./protocol.js";
