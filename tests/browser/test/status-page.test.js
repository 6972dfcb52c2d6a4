// The page at / of the server itself: it shows what is running, and its "try it"
// panel publishes with the typed api key to a live listener on the same page.
// Screenshots land in tests/browser/screenshots/ for a person to look at.
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import path from "node:path";
import { after, before, test } from "node:test";

import { API_KEY, DoloresServer, WAIT_MS, launchBrowser, runAll, tempDir } from "../lib/harness.js";

const shots = path.join(path.dirname(new URL(import.meta.url).pathname), "..", "screenshots");
let dolores;
let browser;
let data;

before(async () => {
  mkdirSync(shots, { recursive: true });
  data = tempDir();
  dolores = await DoloresServer.start({ data: data.dir });
  browser = await launchBrowser();
});

after(async () => {
  await runAll([async () => browser && browser.close(), async () => dolores && dolores.close(), async () => data && data.remove()]);
});

test("the page at / shows the running server and its try-it panel delivers live", async () => {
  const page = await browser.newPage({ viewport: { width: 1100, height: 800 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  await page.goto(`${dolores.url}/`);
  await page.waitForFunction(() => document.getElementById("summary").textContent.includes("engine"), null, { timeout: WAIT_MS });
  assert.match(await page.textContent("#summary"), /^v\d+\.\d+\.\d+ · embedded engine · up /);

  // A wrong key is refused with the server's own words.
  await page.fill("#key", "not-the-key");
  await page.click("#publish");
  await page.waitForFunction(() => document.getElementById("result").textContent !== "", null, { timeout: WAIT_MS });
  assert.match(await page.textContent("#result"), /wrong_api_key/);

  await page.fill("#key", API_KEY);
  await page.fill("#track", ":page-demo");
  await page.click("#listen");
  await page.waitForFunction(() => /^open as /.test(document.getElementById("listen-status").textContent), null, { timeout: WAIT_MS });
  for (let i = 1; i <= 3; i++) {
    await page.fill("#message", JSON.stringify({ hello: i }));
    await page.click("#publish");
    await page.waitForFunction((n) => document.querySelectorAll("#received li").length === n, i, { timeout: WAIT_MS });
  }
  const received = await page.$$eval("#received li", (items) => items.map((li) => li.textContent));
  assert.equal(received.length, 3);
  // Newest first; each line names the track and the message.
  assert.match(received[0], /:page-demo\s+\{"hello":3\}$/);
  assert.match(received[2], /:page-demo\s+\{"hello":1\}$/);

  // The counts catch up with what just happened (the page refreshes every 2 s).
  await page
    .waitForFunction(
      () => document.getElementById("listeners").textContent === "1" && document.getElementById("streams").textContent === "1",
      null,
      { timeout: WAIT_MS },
    )
    .catch(async (e) => {
      const seen = await page.$$eval("#listeners, #streams, #summary", (els) => els.map((el) => el.textContent));
      throw new Error(`the counts never showed 1 listener and 1 stream (saw ${seen.join(" | ")}; page errors: ${errors.join("; ")}): ${e.message}`);
    });
  // The page's listener uses the client's default transport, "auto": a WebSocket.
  assert.match(await page.textContent("#streams-by"), /ws 1/);
  await page.screenshot({ path: path.join(shots, "status-page.png") });
  assert.deepEqual(errors, []);
  await page.close();
});
