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

/** Reads /status until its history has counted `published` messages. */
async function waitForHistory(published) {
  const deadline = Date.now() + WAIT_MS;
  for (;;) {
    const status = JSON.parse((await dolores.request("GET", "/status")).text);
    const sum = status.history.published.reduce((a, b) => a + b, 0);
    if (sum >= published) return status;
    if (Date.now() > deadline) throw new Error(`/status history never counted ${published} published: ${JSON.stringify(status.history)}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

/** The page fits its width (nothing to scroll sideways), and the chart's axis labels sit
 * outside the plot, so no bar can cover them. */
async function checkLayout(page, width) {
  const layout = await page.evaluate(() => {
    const box = (el) => el.getBoundingClientRect().toJSON();
    return {
      scrollWidth: document.documentElement.scrollWidth,
      chart: box(document.getElementById("chart")),
      labels: [...document.querySelectorAll(".chart .axis span, .chart .scale span")].map(box),
    };
  });
  assert.ok(layout.scrollWidth <= width, `at ${width} px the page is ${layout.scrollWidth} px wide`);
  for (const label of layout.labels) {
    const overlaps = label.top < layout.chart.bottom && label.bottom > layout.chart.top;
    assert.ok(!overlaps, `an axis label overlaps the chart: ${JSON.stringify({ label, chart: layout.chart })}`);
  }
}

test("the page at / shows the running server and its try-it panel delivers live", async () => {
  // Published before anyone opens the page: the chart must show it at once.
  await dolores.publish(":before-the-page", ["one", "two", "three", "four"]);
  const status = await waitForHistory(4);
  assert.equal(status.history.every_seconds, 1);
  assert.ok(status.history.published.length <= 300 && status.history.published.length === status.history.delivered.length);

  const page = await browser.newPage({ viewport: { width: 1100, height: 800 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  await page.goto(`${dolores.url}/`);
  await page.waitForFunction(() => document.getElementById("summary").textContent.includes("engine"), null, { timeout: WAIT_MS });
  assert.match(await page.textContent("#summary"), /^v\d+\.\d+\.\d+ · embedded engine · up /);
  // The first refresh draws the last five minutes: the four messages are a bar already.
  assert.ok((await page.$$("#chart rect")).length >= 1, "the chart starts empty");
  assert.match(await page.textContent("#chart-max"), /^\d+(\.\d)?\/s$/);

  // No key typed: the page says to type it, rather than "wrong key".
  await page.click("#publish");
  await page.waitForFunction(() => document.getElementById("result").textContent !== "", null, { timeout: WAIT_MS });
  assert.match(await page.textContent("#result"), /^type the api key/);

  // A wrong key is refused with the server's own words. Waited for by its words: the
  // previous answer is still on the page until this one arrives.
  await page.fill("#key", "not-the-key");
  await page.click("#publish");
  await page
    .waitForFunction(() => /wrong_api_key/.test(document.getElementById("result").textContent), null, { timeout: WAIT_MS })
    .catch(async (e) => {
      throw new Error(`no wrong_api_key answer (saw ${JSON.stringify(await page.textContent("#result"))}): ${e.message}`);
    });
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
  // One of each, in the singular.
  assert.equal(await page.textContent("#listeners-label"), "listener · 1 online");
  assert.match(await page.textContent("#streams-by"), /^open stream \(/);
  await checkLayout(page, 1100);
  await page.screenshot({ path: path.join(shots, "status-page.png") });
  assert.deepEqual(errors, []);
  await page.close();

  // A phone, 390 px wide: one column, nothing wider than the screen.
  const phone = await browser.newPage({ viewport: { width: 390, height: 844 } });
  phone.on("pageerror", (e) => errors.push(e.message));
  await phone.goto(`${dolores.url}/`);
  await phone.waitForFunction(() => document.querySelectorAll("#chart rect").length > 0, null, { timeout: WAIT_MS });
  await checkLayout(phone, 390);
  await phone.screenshot({ path: path.join(shots, "status-page-phone.png"), fullPage: true });
  assert.deepEqual(errors, []);
  await phone.close();
});
