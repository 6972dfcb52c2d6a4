// The common deployment: the app and Dolores on one domain, Dolores at /dolores/ behind
// real nginx and real Caddy run with deploy/nginx.conf and deploy/Caddyfile. The page
// is the app's own (same origin as Dolores), imports the client from
// /dolores/dolores.js and names no server: every transport gets through the proxy, and
// the WebSocket's origin check passes because the proxy's origin is public_origins. The status page works
// under the prefix too.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { API_KEY, DoloresServer, PageServer, TestPage, WAIT_MS, launchBrowser, messages, runAll } from "../lib/harness.js";
import { freePort, startProxy } from "../lib/proxies.js";

const TEST_TIMEOUT_MS = 60000;

for (const [kind, file] of [["nginx", "nginx.conf"], ["caddy", "Caddyfile"]]) {
  describe(`behind ${kind} (deploy/${file})`, () => {
    let browser;
    let pageServer;
    let dolores;
    let proxy;
    const contexts = [];

    before(async () => {
      browser = await launchBrowser();
      pageServer = await PageServer.start();
      // The proxy's port first: its origin is where Dolores' pages are (--public-origins).
      const port = await freePort();
      dolores = await DoloresServer.start({ args: ["--base-path", "/dolores", "--trusted-proxies", "127.0.0.1/32,::1/128", "--public-origins", `http://127.0.0.1:${port}`] });
      pageServer.dolores = dolores;
      proxy = await startProxy(kind, file, { dolores: new URL(dolores.url).host, app: new URL(pageServer.origin).host, port });
    });

    after(async () => {
      await runAll([
        ...contexts.map((context) => () => context.close()),
        async () => browser && browser.close(),
        async () => proxy && proxy.close(),
        async () => dolores && dolores.close(),
        async () => pageServer && pageServer.close(),
      ]);
    });

    /** The app's page, through the proxy, with the client from Dolores under the prefix
     * (or this repo's file, when DOLORES_CLIENT=local). The client finds its server from
     * where it came from, unless `named`: then it is told "/dolores", on the page's origin. */
    async function page(named) {
      const context = await browser.newContext();
      contexts.push(context);
      const local = process.env.DOLORES_CLIENT === "local";
      const client = local ? "/client/dolores.js" : "/dolores/dolores.js";
      const tab = new TestPage(await context.newPage(), `${proxy.origin}/?client=${encodeURIComponent(client)}`);
      await tab.load();
      return { tab, server: local || named ? { server: "/dolores" } : {} };
    }

    for (const transport of ["sse", "ws", "poll", "auto"]) {
      test(`transport "${transport}" delivers live through the proxy`, { timeout: TEST_TIMEOUT_MS }, async () => {
        const { tab, server } = await page(transport === "auto");
        const track = `:${kind}-${transport}`;
        const uid = await tab.start({ ...server, connectUrl: "/:connect/", transport }, [track]);
        await tab.waitForStatus("open");
        assert.ok(pageServer.calls.some((c) => c.uid === uid && c.view === "connect"), "the app's connect view was called through the proxy");
        const sent = messages(`${kind}-${transport}`, 3);
        await dolores.publish(track, sent);
        assert.deepEqual(await tab.waitForLast(sent[2]), sent);
        const state = await tab.state();
        assert.deepEqual(state.errors, [], JSON.stringify(state));
        assert.deepEqual(tab.consoleErrors, []);
      });
    }

    test("the status page under /dolores/ shows the server and its try-it panel delivers", { timeout: TEST_TIMEOUT_MS }, async () => {
      const context = await browser.newContext();
      contexts.push(context);
      const page = await context.newPage();
      const errors = [];
      page.on("pageerror", (e) => errors.push(e.message));
      // The bare prefix leads to the page, whose links are relative to it.
      await page.goto(`${proxy.origin}/dolores`);
      assert.equal(new URL(page.url()).pathname, "/dolores/");
      await page.waitForFunction(() => document.getElementById("summary").textContent.includes("engine"), null, { timeout: WAIT_MS });
      await page.fill("#key", API_KEY);
      await page.fill("#track", `:${kind}-page`);
      await page.click("#listen");
      await page.waitForFunction(() => /^open as /.test(document.getElementById("listen-status").textContent), null, { timeout: WAIT_MS });
      await page.fill("#message", JSON.stringify({ via: kind }));
      await page.click("#publish");
      await page.waitForFunction(() => document.querySelectorAll("#received li").length === 1, null, { timeout: WAIT_MS });
      assert.match(await page.textContent("#received li"), new RegExp(`:${kind}-page\\s+\\{"via":"${kind}"\\}$`));
      assert.deepEqual(errors, []);
    });
  });
}
