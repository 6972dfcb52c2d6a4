// The browser client over transport "auto" (the default), against the real server, in
// Chromium: every guarantee of the other transports (resume, reset, token renewal,
// status, errors) holds where "auto" picks a WebSocket. Its fallbacks: auto.test.js.
import { transportSuite } from "../lib/suite.js";

transportSuite("auto", { stream: "ws" });
