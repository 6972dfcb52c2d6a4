// The browser client over transport "sse", against the real server, in Chromium.
import { transportSuite } from "../lib/suite.js";

transportSuite("sse");
