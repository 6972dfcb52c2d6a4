// The browser client over transport "ws", against the real server, in Chromium.
import { transportSuite } from "../lib/suite.js";

transportSuite("ws");
