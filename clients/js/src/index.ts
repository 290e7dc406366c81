/** durable-chat-client: the thread client, the user-socket client and the generated protocol types. */
export * from "./client.js";
export * from "./protocol.js";
export * from "./user.js";
