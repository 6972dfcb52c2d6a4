// transport "auto": SSE where it gets through, long-polling where something in between
// holds the stream back — with nothing lost in the switch.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import {
  BufferingProxy,
  DoloresServer,
  PageServer,
  TestPage,
  WAIT_MS,
  clientUrl,
  launchBrowser,
  messages,
  sleep,
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

  after(async () => {
    for (const cleanup of cleanups.reverse()) await cleanup().catch(() => {});
    if (browser) await browser.close();
    if (pageServer) await pageServer.close();
  });

  async function server() {
    const dolores = await DoloresServer.start({ corsOrigins: [pageServer.origin] });
    cleanups.push(() => dolores.close());
    pageServer.dolores = dolores;
    client = client || await clientUrl(dolores, pageServer);
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

  async function streams(dolores, kind) {
    const deadline = Date.now() + WAIT_MS;
    for (;;) {
      const stats = await dolores.api("GET", "/api/v1/stats");
      if (stats.streams[kind] >= 1) return;
      if (Date.now() > deadline) throw new Error(`no open ${kind} stream: ${JSON.stringify(stats)}`);
      await sleep(50);
    }
  }

  async function waitForLast(tab, last) {
    await tab.page.waitForFunction((m) => window.received.some((r) => r.message === m), last, { timeout: WAIT_MS, polling: 50 })
      .catch(async (error) => {
        throw new Error(`page never got ${last}: ${JSON.stringify(await tab.state().catch(() => null))}`, { cause: error });
      });
    return tab.received();
  }

  test("auto uses Server-Sent Events where they get through", { timeout: TEST_TIMEOUT_MS }, async () => {
    const dolores = await server();
    const tab = await page();
    await tab.start({ server: dolores.url, connectUrl: "/:connect/", transport: "auto" });
    await streams(dolores, "sse");
    const sent = messages("direct", 3);
    await dolores.publish(":data", sent);
    assert.deepEqual(await waitForLast(tab, sent.at(-1)), sent);
    const stats = await dolores.api("GET", "/api/v1/stats");
    assert.equal(stats.streams.poll, 0, "no long-poll while SSE works");
  });

  for (const holdHeaders of [false, true]) {
    const what = holdHeaders ? "whole SSE responses" : "SSE bodies";
    test(`auto falls back to long-polling behind a proxy that holds ${what} back, losing nothing`, { timeout: TEST_TIMEOUT_MS }, async () => {
      const dolores = await server();
      const buffering = await proxy(dolores, { holdHeaders });
      const tab = await page();
      const uid = await tab.start({ server: buffering.url, connectUrl: "/:connect/", transport: "auto" });

      // While the SSE stream is open on the server but held by the proxy, these are
      // written into it — and never reach the page that way.
      await streams(dolores, "sse");
      const held = messages("held", 3);
      await dolores.publish(":data", held);
      await tab.waitForStatus("open");
      const live = messages("live", 3);
      await dolores.publish(":data", live);
      assert.deepEqual(await waitForLast(tab, live.at(-1)), [...held, ...live]);
      assert.ok(buffering.requests.some((r) => r.startsWith(`/listen/${uid}`)), "SSE was tried");
      assert.ok(buffering.requests.some((r) => r.startsWith(`/poll/${uid}`) && r.includes("timeout=25")), `long-polling took over: ${buffering.requests}`);
      assert.deepEqual((await tab.state()).errors, []);

      // The session remembers: after a reload the page goes straight to long-polling.
      const before = buffering.requests.length;
      await tab.reload();
      assert.equal(await tab.start({ server: buffering.url, connectUrl: "/:connect/", transport: "auto" }), uid);
      const more = messages("after-reload", 2);
      await dolores.publish(":data", more);
      assert.deepEqual(await waitForLast(tab, more.at(-1)), more);
      const since = buffering.requests.slice(before);
      assert.ok(!since.some((r) => r.startsWith("/listen/")), `no SSE attempt after the reload: ${since}`);
    });
  }
});
