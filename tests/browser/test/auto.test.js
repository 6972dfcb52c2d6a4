// transport "auto": a WebSocket where it gets through (browsers do not count WebSockets
// against the six HTTP/1.1 connections per host, so any number of tabs fit — see
// tabs.test.js), SSE where something in between refuses or cuts WebSockets, long-polling
// where SSE is held back too — with nothing lost in a switch, and the switch kept for
// the tab's session.
import assert from "node:assert/strict";
import { after, afterEach, before, describe, test } from "node:test";

import {
  BufferingProxy,
  DoloresServer,
  PageServer,
  TestPage,
  clientUrl,
  launchBrowser,
  messages,
  runAll,
  sleep,
  tempDir,
} from "../lib/harness.js";

const TEST_TIMEOUT_MS = 60000;

describe('transport "auto"', () => {
  let browser;
  let pageServer;
  let client;
  const cleanups = [];

  before(async () => {
    browser = await launchBrowser();
    pageServer = await PageServer.start();
  });

  // What each test started goes after it, newest first; a server that ended badly
  // (exited by itself, not 0 on SIGTERM, a panic) fails that test, with its log.
  afterEach(async () => {
    await runAll(cleanups.splice(0).reverse());
  });

  after(async () => {
    await runAll([async () => browser && browser.close(), async () => pageServer && pageServer.close()]);
  });

  async function server(options = {}) {
    const dolores = await DoloresServer.start({ corsOrigins: [pageServer.origin], ...options });
    cleanups.push(() => dolores.close());
    pageServer.dolores = dolores;
    // Each test closes its servers: the page imports the client from the newest one.
    client = await clientUrl(dolores, pageServer);
    return dolores;
  }

  async function page() {
    const context = await browser.newContext();
    cleanups.push(() => context.close());
    return TestPage.open(context, pageServer, client);
  }

  async function proxy(dolores, options) {
    const p = await BufferingProxy.start(() => dolores.url, options);
    cleanups.push(() => p.close());
    return p;
  }

  const started = (r, uid, path) => r.startsWith(`${path}${uid}`);
  const auto = (url) => ({ server: url, connectUrl: "/:connect/", transport: "auto" });

  test("auto uses a WebSocket where it gets through", { timeout: TEST_TIMEOUT_MS }, async () => {
    const dolores = await server();
    const tab = await page();
    await tab.start(auto(dolores.url));
    await dolores.waitForStream("ws");
    const sent = messages("direct", 3);
    await dolores.publish(":data", sent);
    assert.deepEqual(await tab.waitForLast(sent.at(-1)), sent);
    const stats = await dolores.api("GET", "/api/v1/stats");
    assert.deepEqual([stats.streams.sse, stats.streams.poll], [0, 0], "no SSE, no long-poll while WebSockets work");
  });

  test("auto keeps the WebSocket behind a proxy that buffers SSE but passes upgrades", { timeout: TEST_TIMEOUT_MS }, async () => {
    const dolores = await server();
    const buffering = await proxy(dolores, { websocket: "pass" });
    const tab = await page();
    const uid = await tab.start(auto(buffering.url));
    await dolores.waitForStream("ws");
    const sent = messages("through", 3);
    await dolores.publish(":data", sent);
    assert.deepEqual(await tab.waitForLast(sent.at(-1)), sent);
    assert.ok(buffering.requests.some((r) => started(r, uid, "/ws/")), `the WebSocket went through the proxy: ${buffering.requests}`);
    assert.ok(!buffering.requests.some((r) => started(r, uid, "/listen/")), `no SSE attempt: ${buffering.requests}`);
  });

  for (const websocket of ["refuse", "close"]) {
    const what = websocket === "refuse" ? "refuses WebSocket upgrades" : "closes WebSockets at once";
    test(`auto falls back to SSE behind a proxy that ${what}, losing nothing`, { timeout: TEST_TIMEOUT_MS }, async () => {
      const dolores = await server();
      const blocking = await proxy(dolores, { websocket, buffer: false });
      const tab = await page();
      const uid = await tab.start(auto(blocking.url));
      // Published while the page is still trying WebSockets: queued, then sent over SSE.
      const early = messages("early", 3);
      await dolores.publish(":data", early);
      await dolores.waitForStream("sse");
      await tab.waitForStatus("open");
      const live = messages("live", 3);
      await dolores.publish(":data", live);
      assert.deepEqual(await tab.waitForLast(live.at(-1)), [...early, ...live]);
      const ws = blocking.requests.filter((r) => started(r, uid, "/ws/"));
      assert.equal(ws.length, 2, `two WebSocket attempts before SSE: ${blocking.requests}`);
      assert.ok(!blocking.requests.some((r) => started(r, uid, "/poll/") && r.includes("timeout=25")), `no long-polling: ${blocking.requests}`);
      const { errors, statuses } = await tab.state();
      assert.deepEqual(errors, []);
      assert.ok(!statuses.includes("closed"), `statuses: ${statuses}`);

      // The session remembers: after a reload the page goes straight to SSE.
      const before = blocking.requests.length;
      await tab.reload();
      assert.equal(await tab.start(auto(blocking.url)), uid);
      const more = messages("after-reload", 2);
      await dolores.publish(":data", more);
      assert.deepEqual(await tab.waitForLast(more.at(-1)), more);
      const since = blocking.requests.slice(before);
      assert.ok(!since.some((r) => r.startsWith("/ws/")), `no WebSocket attempt after the reload: ${since}`);
      assert.ok(since.some((r) => started(r, uid, "/listen/")), `SSE after the reload: ${since}`);
    });
  }

  for (const holdHeaders of [false, true]) {
    const what = holdHeaders ? "whole SSE responses" : "SSE bodies";
    test(`auto falls back to long-polling behind a proxy that refuses WebSockets and holds ${what} back, losing nothing`, { timeout: TEST_TIMEOUT_MS }, async () => {
      const dolores = await server();
      const buffering = await proxy(dolores, { websocket: "refuse", holdHeaders });
      const tab = await page();
      const uid = await tab.start(auto(buffering.url));

      // While the SSE stream is open on the server but held by the proxy, these are
      // written into it — and never reach the page that way.
      await dolores.waitForStream("sse");
      const held = messages("held", 3);
      await dolores.publish(":data", held);
      await tab.waitForStatus("open");
      const live = messages("live", 3);
      await dolores.publish(":data", live);
      assert.deepEqual(await tab.waitForLast(live.at(-1)), [...held, ...live]);
      assert.ok(buffering.requests.some((r) => started(r, uid, "/ws/")), "WebSockets were tried");
      assert.ok(buffering.requests.some((r) => started(r, uid, "/listen/")), "SSE was tried");
      assert.ok(buffering.requests.some((r) => started(r, uid, "/poll/") && r.includes("timeout=25")), `long-polling took over: ${buffering.requests}`);
      assert.deepEqual((await tab.state()).errors, []);

      // The session remembers: after a reload the page goes straight to long-polling.
      const before = buffering.requests.length;
      await tab.reload();
      assert.equal(await tab.start(auto(buffering.url)), uid);
      const more = messages("after-reload", 2);
      await dolores.publish(":data", more);
      assert.deepEqual(await tab.waitForLast(more.at(-1)), more);
      const since = buffering.requests.slice(before);
      assert.ok(!since.some((r) => r.startsWith("/listen/") || r.startsWith("/ws/")), `no SSE or WebSocket attempt after the reload: ${since}`);
    });
  }

  test("a server down for a while does not make auto give up WebSockets", { timeout: TEST_TIMEOUT_MS }, async () => {
    // While the server is down, WebSocket attempts fail the way a refused upgrade does,
    // and the SSE tried after them fails too: the server was the problem, not WebSockets.
    const data = tempDir();
    cleanups.push(async () => data.remove());
    const dolores = await server({ data: data.dir });
    const tab = await page();
    await tab.start(auto(dolores.url));
    await dolores.waitForStream("ws");
    const before = messages("before", 2);
    await dolores.publish(":data", before);
    await tab.waitForCount(2);

    await dolores.kill();
    await sleep(4000); // several attempts, SSE among them (backoff 0.5 s, 1 s, 2 s…)
    await dolores.restart();
    const after = messages("after", 2);
    await dolores.publish(":data", after);
    await dolores.waitForStream("ws");
    assert.deepEqual(await tab.waitForLast(after.at(-1)), [...before, ...after]);
    const stats = await dolores.api("GET", "/api/v1/stats");
    assert.equal(stats.streams.sse, 0, `back on a WebSocket, not SSE: ${JSON.stringify(stats.streams)}`);
    const saved = await tab.page.evaluate((key) => JSON.parse(sessionStorage.getItem(key)), `dolores:${dolores.url}`);
    assert.ok(!saved.wsBlocked && !saved.sseBlocked, `nothing taken as blocked: ${JSON.stringify(saved)}`);
  });
});
