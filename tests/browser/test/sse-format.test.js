// The client's own Server-Sent Events parser, against a fake stream on the page's origin
// that uses what the real server does not: CRLF and lone-CR line ends, a BOM, multi-line
// data, fields without a space, unknown events, and chunks cut mid-line and mid-character.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { PageServer, TestPage, WAIT_MS, launchBrowser, sleep } from "../lib/harness.js";

let browser;
let pageServer;

before(async () => {
  browser = await launchBrowser();
  pageServer = await PageServer.start();
});

after(async () => {
  if (browser) await browser.close();
  if (pageServer) await pageServer.close();
});

test("the SSE parser reads every line-end style and chunking, and resumes with the last id", { timeout: 30000 }, async () => {
  const requests = [];
  const unicode = Buffer.from('id: 5\ndata: {"track":":data","message":"ünïcødé ✓"}\n\n');
  const chunks = [
    "\uFEFFretry: 1000\r\n: welcome\r\n\r\n",
    'id: 1\r\ndata: {"track":":data","message":"a"}\r\n\r\n',
    'id: 2\rdata: {"track":":data",', '"message":"b"}\r', "\r",
    'id:3\ndata:{"track":":data",\ndata: "message":"c"}\n\n',
    "id: 4\nevent: something-else\ndata: {}\n\n",
    "data\n\n", // a field with no value and no colon: an empty data line, an event with no JSON
    unicode.subarray(0, unicode.indexOf("ï") + 1), unicode.subarray(unicode.indexOf("ï") + 1),
  ];
  pageServer.routes.set("/fake/listen/", async (req, res, url) => {
    requests.push(Object.fromEntries(url.searchParams));
    res.writeHead(200, { "Content-Type": "text/event-stream", "Cache-Control": "no-cache" });
    if (requests.length > 1) {
      res.write(": welcome back\n\n"); // and stay open until the test ends
      return;
    }
    for (const chunk of chunks) {
      res.write(chunk);
      await sleep(20);
    }
    res.end();
  });
  pageServer.routes.set("/fake/poll/", (req, res) => {
    res.writeHead(500);
    res.end();
  });
  try {
    const context = await browser.newContext();
    const tab = await TestPage.open(context, pageServer, `${pageServer.origin}/client/dolores.js`);
    const server = `${pageServer.origin}/fake`;
    // A saved cursor, so the client opens the stream without probing /poll first.
    await tab.page.evaluate((key) => sessionStorage.setItem(key, JSON.stringify({ uid: "fake-listener-1", last: "0" })), `dolores:${server}`);
    await tab.start({ server, transport: "sse" });
    assert.deepEqual(await tab.waitForCount(4), ["a", "b", "c", "ünïcødé ✓"]);
    await tab.page.waitForFunction(() => window.statuses.filter((s) => s === "open").length >= 2, null, { timeout: WAIT_MS });
    assert.deepEqual(requests.map((r) => r.last_event_id), ["0", "5"], "reconnected with the last id");
    assert.deepEqual((await tab.state()).errors, []);
    await context.close();
  } finally {
    pageServer.routes.clear();
  }
});
