#!/usr/bin/env node
// What an idle SSE stream costs the server over HTTPS: N streams multiplexed on one
// HTTP/2 connection (a browser with many tabs), and N streams each on its own TLS
// connection with HTTP/1.1. Starts target/release/dolores with a throwaway certificate
// (openssl) on a loopback port, reads its VmRSS before and with the streams open.
//
//   node bench/h2-memory.mjs [N]      (default 2000; loopback only)
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import http2 from "node:http2";
import https from "node:https";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const N = Number(process.argv[2] || 2000);
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const bin = process.env.DOLORES_BIN || path.join(root, "target/release/dolores");
const dir = mkdtempSync(path.join(tmpdir(), "dolores-h2-"));
const KEY = "h2-memory-key";
execFileSync("openssl", ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
  "-nodes", "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
  "-keyout", path.join(dir, "key.pem"), "-out", path.join(dir, "cert.pem")], { stdio: "ignore" });

const rss = (pid) => Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))[1]);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function server() {
  const child = spawn(bin, ["serve", "--memory", "--listen", "127.0.0.1:0", "--api-key", KEY,
    "--tls-cert", path.join(dir, "cert.pem"), "--tls-key", path.join(dir, "key.pem")],
  { stdio: ["ignore", "pipe", "ignore"] });
  const line = await new Promise((resolve) => child.stdout.once("data", (d) => resolve(d.toString())));
  const url = /listening on (https:\/\/\S+)/.exec(line)[1];
  return { child, url };
}

async function connectAll(url, prefix) {
  const agent = new https.Agent({ rejectUnauthorized: false, keepAlive: true, maxSockets: 16 });
  const body = (uid) => JSON.stringify({ uid, track: ":idle" });
  const one = (uid) => new Promise((resolve, reject) => {
    const req = https.request(`${url}/api/v1/connect`, { method: "POST", agent,
      headers: { authorization: `Bearer ${KEY}`, "content-type": "application/json" } }, (res) => {
      res.resume();
      res.on("end", resolve);
    });
    req.on("error", reject);
    req.end(body(uid));
  });
  for (let i = 0; i < N; i += 100) {
    await Promise.all(Array.from({ length: Math.min(100, N - i) }, (_, k) => one(`${prefix}-${i + k}`)));
  }
  agent.destroy();
}

async function measure(label, open) {
  const { child, url } = await server();
  await connectAll(url, "idle-listener");
  await sleep(300);
  const before = rss(child.pid);
  const close = await open(url);
  await sleep(2000);
  const during = rss(child.pid);
  const opened = await new Promise((resolve, reject) => {
    https.get(`${url}/api/v1/stats`, { rejectUnauthorized: false, headers: { authorization: `Bearer ${KEY}` } },
      (res) => { let b = ""; res.on("data", (d) => { b += d; }); res.on("end", () => resolve(JSON.parse(b).streams.sse)); })
      .on("error", reject);
  });
  if (opened !== N) console.log(`${label}: only ${opened} of ${N} streams open`);
  console.log(`${label}: ${N} idle SSE streams, ${((during - before) * 1024 / N / 1024).toFixed(1)} KB each ` +
    `(VmRSS ${before} -> ${during} KiB)`);
  close();
  child.kill("SIGTERM");
  await new Promise((resolve) => child.once("exit", resolve));
}

await measure("HTTP/2, one connection", async (url) => {
  const session = http2.connect(url, { rejectUnauthorized: false, settings: { initialWindowSize: 65535 } });
  const streams = [];
  for (let i = 0; i < N; i++) {
    const s = session.request({ ":path": `/listen/idle-listener-${i}` });
    s.on("data", () => {});
    s.on("error", () => {});
    streams.push(s);
    if (i % 100 === 99) await sleep(20);
  }
  return () => session.destroy();
});

await measure("HTTPS HTTP/1.1, one connection each", async (url) => {
  const agent = new https.Agent({ rejectUnauthorized: false, keepAlive: false, maxSockets: Infinity });
  const reqs = [];
  for (let i = 0; i < N; i++) {
    const req = https.get(`${url}/listen/idle-listener-${i}`, { agent }, (res) => res.on("data", () => {}));
    req.on("error", () => {});
    reqs.push(req);
    if (i % 100 === 99) await sleep(50);
  }
  return () => { for (const r of reqs) r.destroy(); agent.destroy(); };
});
rmSync(dir, { recursive: true, force: true });
