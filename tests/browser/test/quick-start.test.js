// The JS client's quick start (clients/js/README.md, "In under a minute"), done as its
// reader would: the commands and the page are read from the README itself, so the test
// fails when the README stops being true. The real binary in a folder of its own (so its
// generated api key is in ./dolores-data, where the client subcommands look), the page
// served by `python3 -m http.server`, Chromium typing the token the page asks for.
import assert from "node:assert/strict";
import { execFile, spawn } from "node:child_process";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import net from "node:net";
import path from "node:path";
import { createInterface } from "node:readline";
import { after, before, test } from "node:test";
import { promisify } from "node:util";

import { WAIT_MS, doloresBin, launchBrowser, repoRoot, sleep, tempDir } from "../lib/harness.js";

const readme = readFileSync(path.join(repoRoot, "clients/js/README.md"), "utf8");
const run = promisify(execFile);

/** The quick start's page: the html block after the comment that names this test. */
function quickStartPage() {
  const marker = readme.indexOf("tests/browser/test/quick-start.test.js runs this page");
  assert.ok(marker > 0, "the README's quick start no longer names this test");
  const block = /```html\n([\s\S]*?)\n\s*```/.exec(readme.slice(marker));
  assert.ok(block, "no html block after the marker");
  // The block is indented as part of a numbered list.
  return block[1].split("\n").map((line) => line.replace(/^ {3}/, "")).join("\n") + "\n";
}

/** The words of the README's one line that starts with `start` (no quoting in it). */
function commandLine(start) {
  const line = readme.split("\n").map((l) => l.trim()).find((l) => l.startsWith(start));
  assert.ok(line, `the README has no line starting with ${start}`);
  return line.split("#")[0].trim().split(/\s+/);
}

async function freePort() {
  const server = net.createServer();
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/** Environment without the caller's DOLORES_* settings. */
function cleanEnv() {
  const env = { ...process.env, RUST_LOG: process.env.RUST_LOG || "warn" };
  for (const key of Object.keys(env)) if (key.startsWith("DOLORES_")) delete env[key];
  return env;
}

let folder;
let dolores; // { child, url, address, log }
let pageServer; // { child, origin, log }
let browser;

const children = new Set();
process.on("exit", () => {
  for (const child of children) child.kill("SIGKILL");
});

/** A child process whose output is kept for the failure message. */
function start(command, args, cwd) {
  const child = spawn(command, args, { cwd, env: cleanEnv(), stdio: ["ignore", "pipe", "pipe"] });
  children.add(child);
  child.on("exit", () => children.delete(child));
  const log = [];
  child.stderr.on("data", (d) => log.push(d.toString()));
  child.on("error", (e) => log.push(`cannot run ${command}: ${e.message}`));
  return { child, log };
}

before(async () => {
  folder = tempDir();
  const pagePort = await freePort();
  const pageOrigin = `http://127.0.0.1:${pagePort}`;

  // 1. `dolores serve --token-secret … --cors-origins http://127.0.0.1:8000`, as written
  // but for the ports, which must be free ones here.
  const serve = commandLine("dolores serve --token-secret");
  assert.deepEqual(serve.slice(0, 2), ["dolores", "serve"]);
  const serveArgs = serve.slice(1).map((word) => word.replace("http://127.0.0.1:8000", pageOrigin));
  assert.ok(serveArgs.includes(pageOrigin), `the quick start's serve command lets no page in: ${serve.join(" ")}`);
  const server = start(doloresBin, [...serveArgs, "--listen", "127.0.0.1:0"], folder.dir);
  const first = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`dolores did not start: ${server.log.join("")}`)), 10000);
    createInterface({ input: server.child.stdout }).once("line", (line) => {
      clearTimeout(timer);
      resolve(line);
    });
    server.child.once("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`dolores exited with ${code}: ${server.log.join("")}`));
    });
  });
  const url = /listening on (http:\/\/\S+)/.exec(first)?.[1];
  assert.ok(url, `unexpected first line: ${first}`);
  dolores = { ...server, url, address: new URL(url).host };

  // 2. The page, as written, with the test's ports.
  const page = quickStartPage()
    .replaceAll("http://127.0.0.1:8007", url)
    .replaceAll("http://127.0.0.1:8000", pageOrigin);
  const site = path.join(folder.dir, "site");
  mkdirSync(site);
  writeFileSync(path.join(site, "index.html"), page);

  // 3. `python3 -m http.server 8000 --bind 127.0.0.1`.
  const serveStatic = commandLine("python3 -m http.server");
  const staticArgs = serveStatic.slice(1).map((word) => (word === "8000" ? String(pagePort) : word));
  assert.ok(staticArgs.includes(String(pagePort)), `the quick start serves the page elsewhere: ${serveStatic.join(" ")}`);
  pageServer = { ...start(serveStatic[0], staticArgs, site), origin: pageOrigin };
  const deadline = Date.now() + 10000;
  for (;;) {
    const answer = await fetch(`${pageOrigin}/`).catch(() => null);
    if (answer && answer.ok) break;
    if (Date.now() > deadline || pageServer.child.exitCode !== null) {
      throw new Error(`python3 -m http.server did not answer: ${pageServer.log.join("")}`);
    }
    await sleep(100);
  }
  browser = await launchBrowser();
});

after(async () => {
  if (browser) await browser.close();
  if (pageServer) pageServer.child.kill("SIGTERM");
  if (dolores && dolores.child.exitCode === null) {
    const exited = new Promise((resolve) => dolores.child.once("exit", (code) => resolve(code)));
    dolores.child.kill("SIGTERM");
    const code = await Promise.race([exited, sleep(10000).then(() => "timeout")]);
    if (code !== 0) {
      dolores.child.kill("SIGKILL");
      throw new Error(`dolores did not exit 0 on SIGTERM (${code}): ${dolores.log.join("")}`);
    }
  }
  if (folder) folder.remove();
});

/** A client subcommand, run in the server's folder as the README says. */
async function cli(args) {
  // The README's commands reach the default address; this server is on a free port.
  const [command, ...rest] = args;
  const { stdout } = await run(doloresBin, [command, "--listen", dolores.address, ...rest], {
    cwd: folder.dir,
    env: cleanEnv(),
    timeout: WAIT_MS,
  }).catch((e) => {
    throw new Error(`dolores ${args.join(" ")} failed: ${e.stderr || e.message}\nserver: ${dolores.log.join("")}`);
  });
  return stdout.trim();
}

test("the JS quick start, as written: a static page gets a message with a pasted token", async () => {
  const page = await browser.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  await page.goto(`${pageServer.origin}/`);

  // 4. The page shows the command to run for its own uid.
  await page.waitForFunction(() => document.getElementById("command").textContent.startsWith("dolores token"), null, { timeout: WAIT_MS });
  const shown = (await page.textContent("#command")).split(" ");
  assert.equal(shown[0], "dolores");
  const uid = await page.evaluate(() => Object.values(sessionStorage).map((v) => JSON.parse(v).uid).find(Boolean));
  assert.equal(shown.at(-1), uid, "the command names the tab's uid");
  const token = await cli(shown.slice(1));
  assert.match(token, /^[\w-]+\.[\w-]+\.[\w-]+$/, "dolores token prints a JWT");
  await page.fill("#token", token);
  await page.press("#token", "Enter");

  // 5. `dolores update :data "contact 42 changed"`.
  assert.ok(readme.includes('`dolores update :data "contact 42 changed"`'), "the README's publish step changed");
  await cli(["update", ":data", "contact 42 changed"]);
  await page
    .waitForFunction(() => [...document.querySelectorAll("#messages li")].some((li) => li.textContent === ':data: "contact 42 changed"'), null, { timeout: WAIT_MS })
    .catch(async (e) => {
      throw new Error(`the page never listed the message (it shows: ${await page.textContent("#messages")}; errors: ${errors.join("; ")}; server: ${dolores.log.join("")}): ${e.message}`);
    });
  assert.deepEqual(await page.$$eval("#messages li", (items) => items.map((li) => li.textContent)), [':data: "contact 42 changed"']);
  assert.deepEqual(errors, []);
  await page.close();
});
