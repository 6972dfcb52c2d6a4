// Token revocation in a real browser, on each transport: once the app disconnects a whole
// listener, the token the page holds is refused with `token_revoked` (401 on SSE and
// long-polling, close 4401 on a WebSocket). The client then drops it and asks token(uid)
// again — with a backoff, a bounded number of times — and without a token function it
// stops and says why.
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { after, afterEach, before, describe, test } from "node:test";

import {
  API_KEY,
  DoloresServer,
  PageServer,
  TOKEN_SECRET,
  TestPage,
  WAIT_MS,
  clientUrl,
  launchBrowser,
  nowSeconds,
  runAll,
  sleep,
} from "../lib/harness.js";

const TEST_TIMEOUT_MS = 60000;

/** An HS256 listener token with `iat`, as an app's token view mints one. */
function tokenIssuedAt(uid, iat) {
  const encode = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const head = `${encode({ alg: "HS256", typ: "JWT" })}.${encode({ sub: uid, iat, exp: iat + 600, tracks: [":data"] })}`;
  return `${head}.${createHmac("sha256", TOKEN_SECRET).update(head).digest("base64url")}`;
}

/** Resolves once the server knows listener `uid` (a token's tracks re-created it). */
async function waitForListener(dolores, uid) {
  const deadline = Date.now() + WAIT_MS;
  for (;;) {
    const answer = await dolores.request("GET", `/api/v1/listeners/${uid}`, { headers: { Authorization: `Bearer ${API_KEY}` } });
    if (answer.status === 200) return;
    if (Date.now() > deadline) throw new Error(`listener ${uid} never came back: ${answer.status} ${answer.text}`);
    await sleep(50);
  }
}

for (const transport of ["sse", "ws", "poll"]) {
  describe(`token revocation, transport "${transport}"`, () => {
    let browser;
    let pageServer;
    let client;
    const cleanups = [];

    before(async () => {
      browser = await launchBrowser();
      pageServer = await PageServer.start();
    });

    afterEach(async () => {
      pageServer.tokens = null;
      await runAll(cleanups.splice(0).reverse());
    });

    after(async () => {
      await runAll([async () => browser && browser.close(), async () => pageServer && pageServer.close()]);
    });

    async function server() {
      const dolores = await DoloresServer.start({ corsOrigins: [pageServer.origin], tokenSecret: TOKEN_SECRET });
      cleanups.push(() => dolores.close());
      pageServer.dolores = dolores;
      client = await clientUrl(dolores, pageServer);
      return dolores;
    }

    async function page() {
      const context = await browser.newContext();
      cleanups.push(() => context.close());
      return TestPage.open(context, pageServer, client);
    }

    /** A page whose saved uid is `uid`, so the test can sign tokens for it up front. */
    async function pageAs(dolores, uid) {
      const tab = await page();
      await tab.page.evaluate(([key, value]) => sessionStorage.setItem(key, value),
        [`dolores:${dolores.url}`, JSON.stringify({ uid, last: null })]);
      return tab;
    }

    test("a revoked token is dropped and token(uid) asked again until one works", { timeout: TEST_TIMEOUT_MS }, async () => {
      const dolores = await server();
      const uid = `replaced-${transport}-page-uid`;
      const before = nowSeconds() - 5;
      await dolores.connect(uid, ":data");
      await dolores.api("POST", "/api/v1/disconnect", { uid });
      // The first token the page gets was issued before the disconnect; the next ones
      // are minted when asked (one of the very second of the disconnect is refused
      // too, and the client asks again after a backoff).
      pageServer.tokens = (u, n) => tokenIssuedAt(u, n === 1 ? before : nowSeconds());
      pageServer.tokenCalls = [];
      const tab = await pageAs(dolores, uid);
      await tab.start({ server: dolores.url, token: "view", transport });
      await tab.waitForStatus("open");
      await waitForListener(dolores, uid);
      await dolores.update(":data", "after");
      assert.deepEqual(await tab.waitForLast("after"), ["after"]);
      assert.ok(pageServer.tokenCalls.length >= 2, `asked token(uid) again: ${pageServer.tokenCalls.length} calls`);
      assert.deepEqual((await tab.state()).errors, []);
    });

    if (transport === "sse") {
      // An open stream of a listener the app forgets ends (SSE says so in a comment;
      // a WebSocket closes 4404 and a waiting poll answers 404, which stop the page):
      // the client comes back with the token it holds, revoked now, and replaces it.
      test("after a disconnect of the open listener, the page comes back with a new token", { timeout: TEST_TIMEOUT_MS }, async () => {
        const dolores = await server();
        pageServer.tokens = (uid) => tokenIssuedAt(uid, nowSeconds());
        pageServer.tokenCalls = [];
        const tab = await page();
        const uid = await tab.start({ server: dolores.url, token: "view", transport });
        await tab.waitForStatus("open");
        await dolores.update(":data", "before");
        await tab.waitForLast("before");
        await dolores.api("POST", "/api/v1/disconnect", { uid });
        await waitForListener(dolores, uid);
        await dolores.update(":data", "after");
        assert.deepEqual(await tab.waitForLast("after"), ["before", "after"]);
        assert.ok(pageServer.tokenCalls.length >= 2, `asked token(uid) again: ${pageServer.tokenCalls.length} calls`);
        assert.deepEqual((await tab.state()).errors, []);
      });
    }

    test("a page stops with token_revoked when token(uid) keeps giving revoked tokens, or there is none", { timeout: TEST_TIMEOUT_MS }, async () => {
      const dolores = await server();
      const uid = `revoked-${transport}-page-uid`;
      const before = nowSeconds() - 5;
      await dolores.connect(uid, ":data");
      await dolores.api("POST", "/api/v1/disconnect", { uid });

      // A fixed token: nothing to ask, the page stops at once and says why.
      const fixed = await pageAs(dolores, uid);
      await fixed.start({ server: dolores.url, token: tokenIssuedAt(uid, before), transport });
      const [error] = await fixed.waitForError();
      assert.deepEqual([error.code, error.fatal], ["token_revoked", true]);
      await fixed.waitForStatus("closed");

      // A token view that only hands out revoked tokens: asked a bounded number of
      // times, with a backoff, then the page stops.
      pageServer.tokens = () => tokenIssuedAt(uid, before);
      pageServer.tokenCalls = [];
      const stubborn = await pageAs(dolores, uid);
      const started = Date.now();
      await stubborn.start({ server: dolores.url, token: "view", transport });
      const [gaveUp] = await stubborn.waitForError();
      assert.deepEqual([gaveUp.code, gaveUp.fatal], ["token_revoked", true]);
      assert.equal(pageServer.tokenCalls.length, 4, "the first token and three more");
      assert.ok(Date.now() - started >= 1000, "each try after a revocation waits");
      const answer = await dolores.request("GET", `/api/v1/listeners/${uid}`, { headers: { Authorization: `Bearer ${API_KEY}` } });
      assert.equal(answer.status, 404, "no revoked token re-created the listener");
    });
  });
}
