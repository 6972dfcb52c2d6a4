// transport "auto": SSE where it gets through, long-polling where something in between
// holds the stream back — with nothing lost in the switch.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import {
  BufferingProxy,
  DoloresServer,
  PageServer,
  TestPage,
  clientUrl,
  launchBrowser,
  messages,
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

  test("auto uses Server-Sent Events where they get through", { timeout: TEST_TIMEOUT_MS }, async () => {
    const dolores = await server();
    const tab = await page();
    await tab.start({ server: dolores.url, connectUrl: "/:connect/", transport: "auto" });
    await dolores.waitForStream("sse");
    const sent = messages("direct", 3);
    await dolores.publish(":data", sent);
    assert.deepEqual(await tab.waitForLast(sent.at(-1)), sent);
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
      await dolores.waitForStream("sse");
      const held = messages("held", 3);
      await dolores.publish(":data", held);
      await tab.waitForStatus("open");
      const live = messages("live", 3);
      await dolores.publish(":data", live);
      assert.deepEqual(await tab.waitForLast(live.at(-1)), [...held, ...live]);
      assert.ok(buffering.requests.some((r) => r.startsWith(`/listen/${uid}`)), "SSE was tried");
      assert.ok(buffering.requests.some((r) => r.startsWith(`/poll/${uid}`) && r.includes("timeout=25")), `long-polling took over: ${buffering.requests}`);
      assert.deepEqual((await tab.state()).errors, []);

      // The session remembers: after a reload the page goes straight to long-polling.
      const before = buffering.requests.length;
      await tab.reload();
      assert.equal(await tab.start({ server: buffering.url, connectUrl: "/:connect/", transport: "auto" }), uid);
      const more = messages("after-reload", 2);
      await dolores.publish(":data", more);
      assert.deepEqual(await tab.waitForLast(more.at(-1)), more);
      const since = buffering.requests.slice(before);
      assert.ok(!since.some((r) => r.startsWith("/listen/")), `no SSE attempt after the reload: ${since}`);
    });
  }
});
