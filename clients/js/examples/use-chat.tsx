// A React chat on durable-chat through the AI SDK's useChat.
//
// In a React app (Vite, Next.js, ...):
//   npm install ai @ai-sdk/react /path/to/durable-chat/clients/js
// run a pod (`durable-chat serve`, auth off locally: CHAT_AUTH=off) and
// render <DurableChat threadId="demo" />. Open it in two tabs: both stream the
// same reply; reload mid-reply and it picks up where it is (resume: true);
// Stop cancels the turn on whichever pod runs it.
import { useChat } from "@ai-sdk/react";
import { DurableChatTransport } from "durable-chat-client/ai-sdk";
import { useState } from "react";

const transport = new DurableChatTransport({
  urls: ["http://127.0.0.1:8000"], // the pods, or the load balancer
  // token: () => fetch("/my-token").then((r) => r.text()),  // with CHAT_AUTH=jwt
});

export function DurableChat({ threadId }: { threadId: string }) {
  const { messages, sendMessage, status, stop, regenerate, error } = useChat({
    id: threadId, // the chat id is the thread id
    transport,
    resume: true, // a reply still being generated streams in from its start
  });
  const [input, setInput] = useState("");
  const busy = status === "submitted" || status === "streaming";
  return (
    <div>
      {messages.map((message) => (
        <p key={message.id}>
          <b>{message.role}:</b>{" "}
          {message.parts.map((part) => (part.type === "text" ? part.text : "")).join("")}
        </p>
      ))}
      {error && <p role="alert">{error.message}</p>}
      <form
        onSubmit={(event) => {
          event.preventDefault();
          if (input.trim()) void sendMessage({ text: input });
          setInput("");
        }}
      >
        <input value={input} onChange={(event) => setInput(event.target.value)} />
        {busy ? (
          <button type="button" onClick={() => void stop()}>Stop</button>
        ) : (
          <>
            <button type="submit">Send</button>
            <button type="button" onClick={() => void regenerate()}>Regenerate</button>
          </>
        )}
      </form>
    </div>
  );
}
