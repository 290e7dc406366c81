// The demo page loads the client from its own pod (app/web), never from a CDN:
// after a build, the compiled client (one self-contained ES module) is copied
// there. tests/integration/test_js_client.py fails when the two differ.
import { copyFileSync } from "node:fs";

copyFileSync(
  new URL("../dist/client.js", import.meta.url),
  new URL("../../../app/web/durable-chat-client.js", import.meta.url),
);
