// The behaviour every transport must show in a real browser, as one suite per
// transport: test/sse.test.js, test/ws.test.js, test/poll.test.js, and
// test/auto-suite.test.js for "auto" (the default).

import assert from "node:assert/strict";
import { after, afterEach, before, describe, test } from "node:test";

import {
  CSRF_TOKEN,
  DoloresServer,
  PageServer,
  TOKEN_SECRET,
  TestPage,
  WAIT_MS,
  clientUrl,
  launchBrowser,
  messages,
  nowSeconds,
  runAll,
  signToken,
  sleep,
  tempDir,
} from "./harness.js";

/** Each test is bounded: a hung browser or server fails the test, never the run. */
const TEST_TIMEOUT_MS = 60000;

/**
 * Resolves once `dolores` refuses a token expiring at `exp` (seconds) as `token_expired`:
 * it asks with a probe token of its own (another uid, its own track, the same `exp`), so
 * no listener of the test is touched. Bounded by the 60 s leeway plus WAIT_MS.
 */
async function waitForExpiry(dolores, exp) {
  const uid = `expiry-probe-${exp}`;
  const probe = signToken({ uid, tracks: [":expiry-probe"], exp });
  const deadline = Date.now() + (exp + 60 - nowSeconds()) * 1000 + WAIT_MS;
  for (;;) {
    const answer = await dolores.request("GET", `/poll/${uid}?timeout=0&token=${probe}`);
    if (answer.status === 401 && JSON.parse(answer.text).error.code === "token_expired") return;
    if (answer.status !== 200) throw new Error(`the expiry probe got ${answer.status}: ${answer.text}`);
    if (Date.now() > deadline) throw new Error(`a token with exp ${exp} is still taken at ${nowSeconds()}`);
    await sleep(200);
  }
}

/** `stream`: the kind of stream the server counts for this transport ("auto" opens a
 * WebSocket where nothing blocks it). */
export function transportSuite(transport, { stream = transport } = {}) {
  describe(`transport "${transport}"`, () => {
    let browser;
    let pageServer;
    let client;
    const cleanups = [];

    before(async () => {
      browser = await launchBrowser();
      pageServer = await PageServer.start();
    });

    // After each test, what it started goes, newest first — and a server that exited by
    // itself, did not exit 0 on SIGTERM or panicked fails that test, with its log.
    afterEach(async () => {
      await runAll(cleanups.splice(0).reverse());
    });

    after(async () => {
      await runAll([async () => browser && browser.close(), async () => pageServer && pageServer.close()]);
    });

    /** A dolores for this test (memory unless `data`), its page origin allowed by CORS. */
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

    function options(dolores, extra = {}) {
      return { server: dolores.url, connectUrl: "/:connect/", disconnectUrl: "/:disconnect/", transport, ...extra };
    }

    test("a page receives each message of its tracks, in order, through the app's connect view", { timeout: TEST_TIMEOUT_MS }, async () => {
      const dolores = await server();
      const tab = await page();
      const uid = await tab.start(options(dolores), [":data", "rooms/42;a"]);
      assert.match(uid, /^[A-Za-z0-9._-]{8,128}$/);
      const views = pageServer.calls.filter((c) => c.uid === uid);
      assert.deepEqual(views.map((c) => [c.view, c.track]), [["connect", ":data"], ["connect", "rooms/42;a"]]);
      assert.ok(views.every((c) => c.csrf === CSRF_TOKEN), "the connect view got X-CSRFToken from the csrftoken cookie");

      await dolores.update(":data", "one");
      await dolores.update("rooms/42;a", { contact: 42, tags: ["x"] });
      await dolores.update(":other", "not mine");
      await dolores.update(":data", 3);
      await tab.waitForCount(3);
      const state = await tab.state();
      assert.deepEqual(state.received, [
        { track: ":data", message: "one" },
        { track: "rooms/42;a", message: { contact: 42, tags: ["x"] } },
        { track: ":data", message: 3 },
      ]);
      assert.equal(state.statuses.at(-1), "open");
      assert.deepEqual(state.errors, []);
      await dolores.waitForStream(stream);

      // disconnect: the app's view unsubscribes the track; its messages stop.
      await tab.page.evaluate(() => window.dolores.disconnect("rooms/42;a"));
      assert.deepEqual(pageServer.calls.filter((c) => c.uid === uid).at(-1), { view: "disconnect", track: "rooms/42;a", uid, csrf: CSRF_TOKEN });
      await dolores.update("rooms/42;a", "after disconnect");
      await dolores.update(":data", "last");
      assert.deepEqual(await tab.waitForLast("last"), ["one", { contact: 42, tags: ["x"] }, 3, "last"]);
      assert.deepEqual(tab.consoleErrors, []);
    });

    test("two pages see the same messages in the same order", { timeout: TEST_TIMEOUT_MS }, async () => {
      const dolores = await server();
      const [first, second] = [await page(), await page()];
      const uids = [await first.start(options(dolores), [":a", ":b"]), await second.start(options(dolores), [":a", ":b"])];
      assert.notEqual(uids[0], uids[1]);
      const published = [];
      for (let i = 1; i <= 30; i += 1) {
        const track = i % 3 === 0 ? ":b" : ":a";
        published.push(`${track}-${i}`);
        await dolores.update(track, `${track}-${i}`);
      }
      // A batch too: all of it in its order.
      const batch = messages("batch", 10);
      await dolores.api("POST", "/api/v1/update", { updates: batch.map((m, i) => ({ track: i % 2 ? ":a" : ":b", message: m })) });
      published.push(...batch);
      assert.deepEqual(await first.waitForCount(published.length), published);
      assert.deepEqual(await second.waitForCount(published.length), published);
    });

    test("a page resumes after the server is killed and restarted, nothing lost, nothing doubled", { timeout: TEST_TIMEOUT_MS }, async () => {
      const data = tempDir();
      cleanups.push(async () => data.remove());
      const dolores = await server({ data: data.dir });
      const tab = await page();
      await tab.start(options(dolores));
      const before = messages("before", 5);
      await dolores.publish(":data", before);
      await tab.waitForCount(5);

      await dolores.kill();
      await dolores.restart();
      const during = messages("queued", 5);
      await dolores.publish(":data", during); // most likely before the page is back: queued
      await tab.waitForStatus("open");
      const afterwards = messages("after", 5);
      await dolores.publish(":data", afterwards);
      const all = [...before, ...during, ...afterwards];
      assert.deepEqual(await tab.waitForLast(all.at(-1)), all);
      const { statuses, errors } = await tab.state();
      assert.ok(statuses.includes("connecting"), `the page saw the drop: ${statuses}`);
      assert.deepEqual(errors.filter((e) => e.fatal), []);
    });

    test("a reload resumes the same listener and its queue exactly", { timeout: TEST_TIMEOUT_MS }, async () => {
      const dolores = await server();
      const tab = await page();
      const uid = await tab.start(options(dolores));
      const first = messages("first", 4);
      await dolores.publish(":data", first);
      assert.deepEqual(await tab.waitForCount(4), first);

      await tab.reload(); // the new page has no Dolores until start(): messages queue up
      const whileAway = messages("away", 4);
      await dolores.publish(":data", whileAway);
      assert.equal(await tab.start(options(dolores)), uid, "same uid after a reload (sessionStorage)");
      const live = messages("live", 2);
      await dolores.publish(":data", live);
      assert.deepEqual(await tab.waitForLast(live.at(-1)), [...whileAway, ...live]);
    });

    test("a page away for longer than the store keeps gets one reset, then live messages", { timeout: TEST_TIMEOUT_MS }, async () => {
      const dolores = await server({ args: ["--max-stored-messages", "5"] });
      const tab = await page();
      const uid = await tab.start(options(dolores));
      await dolores.update(":data", "seen");
      await tab.waitForCount(1);

      await tab.reload();
      await dolores.publish(":data", messages("trimmed", 12)); // only the last 5 are kept
      assert.equal(await tab.start(options(dolores)), uid);
      await tab.page.waitForFunction(() => window.resets === 1, null, { timeout: WAIT_MS, polling: 50 });
      await dolores.update(":data", "live");
      assert.deepEqual(await tab.waitForLast("live"), ["live"]);

      // The reset's id is the new cursor: the next reload needs no reset.
      await tab.reload();
      await dolores.update(":data", "next");
      await tab.start(options(dolores));
      assert.deepEqual(await tab.waitForLast("next"), ["next"]);
      assert.equal((await tab.state()).resets, 0);
    });

    test("a saved event id the server cannot read is dropped with a reset", { timeout: TEST_TIMEOUT_MS }, async () => {
      const dolores = await server();
      const tab = await page();
      const uid = "saved-uid-with-a-bad-cursor";
      await tab.page.evaluate(([key, value]) => sessionStorage.setItem(key, value),
        [`dolores:${dolores.url}`, JSON.stringify({ uid, last: "not-an-id" })]);
      assert.equal(await tab.start(options(dolores)), uid, "the saved uid is used");
      await tab.page.waitForFunction(() => window.resets === 1, null, { timeout: WAIT_MS, polling: 50 });
      await tab.waitForStatus("open");
      await dolores.update(":data", "fine");
      assert.deepEqual(await tab.waitForLast("fine"), ["fine"]);
      assert.deepEqual((await tab.state()).errors, []);
    });

    test("an expired listener token is fetched again, at the start and on a reconnect", { timeout: TEST_TIMEOUT_MS }, async () => {
      const data = tempDir();
      cleanups.push(async () => data.remove());
      const dolores = await server({ data: data.dir, tokenSecret: TOKEN_SECRET });
      // 1st token: expired past the server's 60 s leeway. 2nd: minted when the page asks
      // for it, right before it opens the stream, and inside the leeway for 7-8 s only:
      // it opens the stream, and has expired by the reconnect. Later ones: good for 10
      // minutes. All grant :data (no connect view needed).
      let shortExp = null;
      pageServer.tokens = (uid, n) => {
        if (n === 1) return signToken({ uid, tracks: [":data"], exp: nowSeconds() - 120 });
        if (n === 2) {
          shortExp = nowSeconds() - 52;
          return signToken({ uid, tracks: [":data"], exp: shortExp });
        }
        return signToken({ uid, tracks: [":data"], exp: nowSeconds() + 600 });
      };
      pageServer.tokenCalls = [];
      const tab = await page();
      const uid = await tab.start({ server: dolores.url, token: "view", transport });
      await tab.waitForStatus("open");
      assert.deepEqual(pageServer.tokenCalls, [uid, uid], "the expired token was replaced once, and the second one opened the stream");
      const first = messages("tok", 3);
      await dolores.publish(":data", first);
      await tab.waitForCount(3);

      // Wait until the server itself takes the second token's expiry as past (not a
      // fixed sleep), then make the page reconnect.
      await waitForExpiry(dolores, shortExp);
      assert.equal(await dolores.stop(), 0, "SIGTERM exits 0");
      await dolores.restart();
      const second = messages("tok-after", 3);
      await dolores.publish(":data", second);
      assert.deepEqual(await tab.waitForLast(second.at(-1)), [...first, ...second]);
      assert.equal(pageServer.tokenCalls.length, 3, "one more token after the reconnect");
      assert.deepEqual((await tab.state()).errors, []);
      pageServer.tokens = null;
    });

    test("a page stops and says why on a bad token or an unknown listener", { timeout: TEST_TIMEOUT_MS }, async () => {
      const open = await server();
      const unknown = await page();
      await unknown.start({ server: open.url, transport }); // no connect view, no token: never connected
      const [notFound] = await unknown.waitForError();
      assert.deepEqual([notFound.code, notFound.fatal], ["unknown_listener", true]);
      await unknown.waitForStatus("closed");

      const guarded = await server({ tokenSecret: TOKEN_SECRET });
      pageServer.tokens = () => "not-a-token";
      const bad = await page();
      await bad.start({ server: guarded.url, token: "view", transport });
      const [badToken] = await bad.waitForError();
      assert.deepEqual([badToken.code, badToken.fatal], ["bad_token", true]);
      await bad.waitForStatus("closed");

      pageServer.tokens = () => signToken({ uid: "someone-else", tracks: [":data"], exp: nowSeconds() + 600 });
      const wrong = await page();
      await wrong.start({ server: guarded.url, token: "view", transport });
      const [wrongListener] = await wrong.waitForError();
      assert.deepEqual([wrongListener.code, wrongListener.fatal], ["token_wrong_listener", true]);
      pageServer.tokens = null;
    });
  });
}
