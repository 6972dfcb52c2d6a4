// The server serves this repo's client at GET /dolores.js, importable from an app's
// page on another origin (a module script is fetched with CORS).
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { after, before, test } from "node:test";

import { DoloresServer, PageServer, clientFile, runAll } from "../lib/harness.js";

let dolores;
let pageServer;

before(async () => {
  pageServer = await PageServer.start();
  dolores = await DoloresServer.start({ corsOrigins: [pageServer.origin] });
});

after(async () => {
  await runAll([async () => dolores && dolores.close(), async () => pageServer && pageServer.close()]);
});

test("the server serves clients/js/dolores.js at /dolores.js, with CORS for allowed origins", async () => {
  const response = await dolores.request("GET", "/dolores.js", { headers: { Origin: pageServer.origin } });
  assert.equal(response.status, 200, "GET /dolores.js");
  assert.match(response.headers["content-type"] || "", /^(text|application)\/javascript/);
  assert.ok(["*", pageServer.origin].includes(response.headers["access-control-allow-origin"]),
    `Access-Control-Allow-Origin: ${response.headers["access-control-allow-origin"]}`);
  assert.equal(response.text, readFileSync(clientFile, "utf8"), "the binary serves the current clients/js/dolores.js (rebuild it)");
});
