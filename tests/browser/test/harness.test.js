// The harness itself (lib/harness.js), no browser: each server incarnation has its own
// connection pool and is only handed over once it answers /healthz; a request right
// after a kill and restart works; a server that crashes, panics or does not exit 0 on
// SIGTERM fails close() with its log. Bad ends are played by lib/fake-server.js.
import assert from "node:assert/strict";
import path from "node:path";
import { after, test } from "node:test";

import { DoloresServer, messages, runAll, tempDir } from "../lib/harness.js";

const fake = path.join(path.dirname(new URL(import.meta.url).pathname), "..", "lib", "fake-server.js");
const servers = [];
const dirs = [];

/** Starts the fake (`flags` after the harness's own), kept for the cleanup. */
async function startFake(...flags) {
  const server = await DoloresServer.start({ command: [process.execPath, fake], args: flags });
  servers.push(server);
  return server;
}

after(async () => {
  await runAll([...servers.map((s) => async () => s.close().catch(() => {})), ...dirs.map((d) => async () => d.remove())]);
});

test("start() and restart() resolve only once /healthz answers, each incarnation with its own agent", async () => {
  let t0 = Date.now();
  const server = await startFake("--healthy-after", "600");
  assert.ok(Date.now() - t0 >= 600, `start() resolved after ${Date.now() - t0} ms, before /healthz answered 200`);
  const first = server.agent;
  assert.equal((await server.request("GET", "/healthz")).status, 200);

  await server.kill();
  assert.equal(first.destroyed, true, "the killed incarnation's agent is destroyed");
  assert.equal(server.agent, null);
  await assert.rejects(server.api("GET", "/api/v1/stats"), /not running[\s\S]*its log:[\s\S]*fake dolores listening on/);

  t0 = Date.now();
  await server.restart();
  assert.ok(Date.now() - t0 >= 600, `restart() resolved after ${Date.now() - t0} ms, before /healthz answered 200`);
  assert.notEqual(server.agent, first, "a new agent for the new incarnation");
  assert.equal((await server.request("GET", "/healthz")).status, 200);
  const second = server.agent;
  await server.close();
  assert.equal(second.destroyed, true, "the stopped incarnation's agent is destroyed");
});

test("the real server answers right after each of five kills and restarts, and keeps what it stored", async () => {
  const data = tempDir();
  dirs.push(data);
  const server = await DoloresServer.start({ data: data.dir });
  servers.push(server);
  const uid = "harness-restarts-1";
  await server.connect(uid, ":harness");
  const sent = messages("restart", 5);
  for (const [round, message] of sent.entries()) {
    await server.update(":harness", message);
    await server.kill();
    await server.restart();
    // The very first call after restart(): no pooled socket of the killed process.
    const stats = await server.api("GET", "/api/v1/stats");
    assert.equal(stats.messages_stored, round + 1, `round ${round + 1}: ${JSON.stringify(stats)}`);
  }
  const queue = JSON.parse((await server.request("GET", `/poll/${uid}?timeout=0`)).text);
  assert.deepEqual(queue.events.map((e) => e.message), sent, "the listener's queue survived every kill");
  await server.close();
});

test("a failed call throws with the server's log", async () => {
  const server = await DoloresServer.start({});
  servers.push(server);
  const error = await server.api("GET", "/api/v1/no-such-call").then(() => null, (e) => e);
  assert.ok(error, "a 404 is an error");
  assert.equal(error.status, 404);
  assert.match(error.message, /answered 404[\s\S]*incarnation 1, running as pid \d+\); its log:[\s\S]*\[1\] dolores .*listening on http/);
  await server.close();
});

test("close() throws with the log when the real server was killed by someone else", async () => {
  const server = await DoloresServer.start({});
  servers.push(server);
  process.kill(server.child.pid, "SIGKILL");
  await server.child.exited;
  await assert.rejects(server.close(), /incarnation 1 exited by itself with signal SIGKILL[\s\S]*listening on/);
});

test("close() throws when a server exited by itself, even one restarted since", async () => {
  const server = await startFake();
  await server.request("POST", "/exit").catch(() => {});
  await server.child.exited;
  await server.restart();
  await assert.rejects(server.close(), /incarnation 1 exited by itself with code 7[\s\S]*fake: exiting with 7 as asked/);
});

test("close() throws when SIGTERM does not end in exit code 0", async () => {
  const server = await startFake("--term-code", "3");
  await assert.rejects(server.close(), /SIGTERM ended in code 3, not exit code 0[\s\S]*fake: SIGTERM, exiting with 3/);
});

test("close() throws when the log shows a panic, though the process lived on", async () => {
  const server = await startFake();
  assert.equal((await server.request("POST", "/panic")).status, 200);
  await assert.rejects(server.close(), /it panicked[\s\S]*fake boom/);
});

test("a kill() by the test itself is no failure", async () => {
  const server = await startFake();
  await server.kill();
  await server.close();
});
