// Any number of tabs of one app in one browser. All tabs of a browser context share one
// connection pool, and over HTTP/1.1 it keeps at most six connections per host: when
// every tab held an SSE stream, the seventh tab could not even fetch /dolores.js. Here
// 20 tabs each get every message of their tracks, once and in order, and a 21st tab
// still loads the page, /dolores.js and a fetch — over plain HTTP/1.1 and over HTTPS
// with HTTP/2 (where even SSE, the fallback behind a proxy that blocks WebSockets, fits).
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import {
  DoloresServer,
  PageServer,
  TestPage,
  launchBrowser,
  messages,
  runAll,
  selfSignedCert,
  tempDir,
} from "../lib/harness.js";

const TABS = 20;
/** Messages on the track every tab has; every other one also goes to a second track. */
const MESSAGES = 20;
const TEST_TIMEOUT_MS = 180000;
/** A tab that cannot load or start within this long is stuck behind the others. */
const TAB_TIMEOUT_MS = 15000;

/** Rejects with `what` when `promise` takes longer than `ms`. */
function within(ms, what, promise) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} took over ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

for (const tls of [false, true]) {
  describe(tls ? "tabs over HTTPS with HTTP/2" : "tabs over plain HTTP/1.1", () => {
    let browser;
    let pageServer;
    let certs;
    let cert;
    let dolores;

    before(async () => {
      browser = await launchBrowser({ ignoreCertificateErrors: tls });
      pageServer = await PageServer.start();
      certs = tempDir();
      cert = tls ? selfSignedCert(certs.dir) : undefined;
    });

    after(async () => {
      await runAll([
        async () => browser && browser.close(),
        async () => dolores && dolores.close(),
        async () => pageServer && pageServer.close(),
        async () => certs && certs.remove(),
      ]);
    });

    // "auto" (the default), and — over HTTP/2 only — SSE, which is what "auto" falls back
    // to behind a proxy that blocks WebSockets: over HTTP/2 it fits too (README).
    const runs = tls ? [["auto", "ws"], ["sse", "sse"]] : [["auto", "ws"]];
    for (const [transport, stream] of runs) {
      test(`${TABS} tabs of one browser on "${transport}" each get every message of their tracks once, in order; a ${TABS + 1}st tab still loads`, { timeout: TEST_TIMEOUT_MS }, async () => {
        if (dolores) await dolores.close();
        dolores = await DoloresServer.start({ corsOrigins: [pageServer.origin], tls: cert });
        pageServer.dolores = dolores;
        assert.equal(new URL(dolores.url).protocol, tls ? "https:" : "http:", `dolores listens on ${dolores.url}`);
        // The client from the server itself: /dolores.js must load in every tab.
        const client = `${dolores.url}/dolores.js`;
        const context = await browser.newContext();
        const options = { server: dolores.url, connectUrl: "/:connect/", transport };
        const tracksOf = (i) => (i % 2 ? [":all", ":odd"] : [":all"]);

        // One after the other, as a person opens tabs: each must load and connect while
        // the ones before it hold their streams.
        const tabs = [];
        for (let i = 0; i < TABS; i += 1) {
          const tab = await within(TAB_TIMEOUT_MS, `loading tab ${i + 1}`, TestPage.open(context, pageServer, client));
          await within(TAB_TIMEOUT_MS, `starting the client in tab ${i + 1}`, tab.start(options, tracksOf(i)));
          tabs.push(tab);
        }
        await Promise.all(tabs.map((tab) => tab.waitForStatus("open")));
        const uids = await Promise.all(tabs.map(async (tab) => (await tab.state()).uid));
        assert.equal(new Set(uids).size, TABS, "each tab is its own listener");
        // Every tab on the stream its transport should use: for "auto" a WebSocket
        // (clients/js/README.md: WebSockets do not count against the six connections per
        // host), nothing on SSE.
        const stats = await dolores.waitForStream(stream, TABS);
        assert.equal(stats.streams.sse + stats.streams.ws, TABS, `every tab on ${stream}: ${JSON.stringify(stats.streams)}`);

        const expected = (i) => {
          const out = [];
          for (let n = 1; n <= MESSAGES; n += 1) {
            out.push(`all-${n}`);
            if (n % 2 === 0 && i % 2) out.push(`odd-${n}`);
          }
          return out;
        };
        for (let n = 1; n <= MESSAGES; n += 1) {
          await dolores.update(":all", `all-${n}`);
          if (n % 2 === 0) await dolores.update(":odd", `odd-${n}`);
        }
        // The last message closes the count: anything doubled before it shows up too.
        await dolores.update(":all", "end-1");
        for (const [i, tab] of tabs.entries()) {
          assert.deepEqual(await tab.waitForLast("end-1"), [...expected(i), "end-1"], `tab ${i + 1}`);
        }

        // Tab 21: the page, /dolores.js and a plain fetch to the server all still answer.
        const extra = await within(TAB_TIMEOUT_MS, `loading tab ${TABS + 1}`, TestPage.open(context, pageServer, client));
        const cdp = await context.newCDPSession(extra.page);
        const protocols = new Map();
        cdp.on("Network.responseReceived", ({ response }) => protocols.set(response.url, response.protocol));
        await cdp.send("Network.enable");
        const answer = await within(TAB_TIMEOUT_MS, `a fetch from tab ${TABS + 1}`, extra.page.evaluate(async (url) => {
          const response = await fetch(url, { cache: "no-store" });
          return { status: response.status, length: (await response.text()).length };
        }, client));
        assert.equal(answer.status, 200, `GET ${client} from tab ${TABS + 1}`);
        assert.ok(answer.length > 1000, "the client's source came back");
        // The protocol the browser really used with the server.
        assert.equal(protocols.get(client), tls ? "h2" : "http/1.1", `protocols seen: ${JSON.stringify([...protocols])}`);
        await within(TAB_TIMEOUT_MS, `starting the client in tab ${TABS + 1}`, extra.start(options, [":all"]));
        await extra.waitForStatus("open");
        const last = messages("end", 3, 2);
        await dolores.publish(":all", last);
        assert.deepEqual(await extra.waitForLast(last.at(-1)), last);
        for (const [i, tab] of tabs.entries()) {
          assert.deepEqual(await tab.waitForLast(last.at(-1)), [...expected(i), "end-1", ...last], `tab ${i + 1}`);
          const state = await tab.state();
          assert.deepEqual(state.errors, [], `tab ${i + 1} errors`);
          assert.deepEqual(tab.consoleErrors, [], `tab ${i + 1} page errors`);
          assert.ok(!state.statuses.includes("closed"), `tab ${i + 1} statuses: ${state.statuses}`);
        }
        await context.close();
      });
    }
  });
}
