// The browser client over transport "poll", against the real server, in Chromium.
import { transportSuite } from "../lib/suite.js";

transportSuite("poll");
