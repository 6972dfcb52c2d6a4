// The pieces every browser test uses: the real dolores binary, a page server on another
// origin (the "app": test page, connect/disconnect views, token view), a buffering proxy,
// and Debian's Chromium driven by playwright-core.

import { execFileSync, spawn } from "node:child_process";
import { createHash, createHmac } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import http from "node:http";
import net from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

import { chromium } from "playwright-core";
import { Agent, request as undiciRequest } from "undici";

const here = path.dirname(fileURLToPath(import.meta.url));
export const repoRoot = path.resolve(here, "../../..");
export const clientFile = path.join(repoRoot, "clients/js/dolores.js");
const pageFile = path.join(here, "page.html");

/** The binary under test: $DOLORES_BIN, else the debug build. */
export const doloresBin = process.env.DOLORES_BIN
  ? path.resolve(repoRoot, process.env.DOLORES_BIN)
  : path.join(repoRoot, "target/debug/dolores");

export const API_KEY = "browser-test-key";
export const TOKEN_SECRET = "browser-test-secret";
export const CSRF_TOKEN = "csrf-browser-test-0123456789";

/** How long a test waits for something the page should see. Generous for a loaded CI
 * machine; a passing test returns as soon as the condition holds. */
export const WAIT_MS = 20000;

const children = new Set();
process.on("exit", () => {
  for (const child of children) child.kill("SIGKILL");
});

/** A temporary directory, removed by the returned function. */
export function tempDir() {
  const dir = mkdtempSync(path.join(tmpdir(), "dolores-browser-"));
  return { dir, remove: () => rmSync(dir, { recursive: true, force: true }) };
}

/** Lines of a server's log kept for error messages (the newest). */
const LOG_LINES = 400;
/** How long a fresh server has to print its address and answer `/healthz`. */
const START_MS = 10000;

/**
 * One dolores server process; `restart()` brings it back on the same port and data.
 *
 * Each incarnation (start, then every restart) has its own undici `Agent`, destroyed
 * when that process is killed or stopped: no request can ever go out on a kept-alive
 * socket of an earlier process on the same port (which is how a request right after a
 * restart once failed with ECONNRESET). `start()` and `restart()` resolve only once
 * `/healthz` answers 200 through the new agent while the new process is alive. Every
 * failed call throws with the server's log; `close()` throws when a process exited
 * without being asked to, exited non-zero on SIGTERM, or panicked.
 */
export class DoloresServer {
  constructor(options) {
    this.options = options;
    this.child = null;
    this.url = null;
    this.port = options.port || 0;
    /** stdout and stderr of every incarnation, each line tagged `[n]`. */
    this.log = [];
    /** The current incarnation's connection pool (null while no process runs). */
    this.agent = null;
    this.incarnation = 0;
    /** Processes that had been listening and exited without kill()/stop(). */
    this.unexpectedExits = [];
  }

  /**
   * @param {{data?: string, corsOrigins?: string[], tokenSecret?: string, heartbeat?: string, args?: string[],
   *   tls?: {cert: string, key: string}, command?: string[]}} options
   *   without `data` the server keeps everything in memory; with `tls` (PEM file paths,
   *   e.g. from `selfSignedCert()`) it serves HTTPS with HTTP/2, and the harness's own
   *   requests trust exactly that certificate; `command` (a program and its first
   *   arguments) runs in place of the binary under test (the harness's own tests use a
   *   fake server)
   */
  static async start(options = {}) {
    const server = new DoloresServer(options);
    await server.#spawn();
    return server;
  }

  async #spawn() {
    const o = this.options;
    const [bin, ...before] = o.command || [doloresBin];
    const args = [...before, "serve", "--listen", `127.0.0.1:${this.port}`, "--api-key", API_KEY];
    args.push(...(o.data ? ["--data", o.data] : ["--memory"]));
    if (o.tokenSecret) args.push("--token-secret", o.tokenSecret);
    if (o.corsOrigins && o.corsOrigins.length) args.push("--cors-origins", o.corsOrigins.join(","));
    if (o.heartbeat) args.push("--heartbeat", o.heartbeat);
    if (o.tls) args.push("--tls-cert", o.tls.cert, "--tls-key", o.tls.key);
    if (o.args) args.push(...o.args);
    const env = { ...process.env, RUST_LOG: process.env.RUST_LOG || "warn" };
    for (const key of Object.keys(env)) if (key.startsWith("DOLORES_") && key !== "DOLORES_BIN") delete env[key];
    this.incarnation += 1;
    const n = this.incarnation;
    const child = spawn(bin, args, { env, stdio: ["ignore", "pipe", "pipe"] });
    children.add(child);
    this.child = child;
    /** Set by #signal: this process is being stopped on purpose. */
    child.onPurpose = false;
    child.listening = false;
    const exited = new Promise((resolve) => {
      child.once("exit", (code, signal) => {
        children.delete(child);
        const unasked = child.listening && !child.onPurpose ? " (not asked to)" : "";
        this.#record(n, `exited with ${describeExit(code, signal)}${unasked}`);
        if (child.listening && !child.onPurpose) this.unexpectedExits.push({ incarnation: n, code, signal });
        resolve({ code, signal });
      });
    });
    child.exited = exited;
    const stdout = createInterface({ input: child.stdout });
    createInterface({ input: child.stderr }).on("line", (line) => this.#record(n, line));
    const first = new Promise((resolve, reject) => {
      stdout.once("line", resolve);
      child.once("error", (e) => reject(new Error(`cannot run ${bin}: ${e.message} (build it with cargo build, or set DOLORES_BIN)`)));
      exited.then(({ code, signal }) => reject(new Error(`dolores exited with ${describeExit(code, signal)} before listening`)));
    });
    stdout.on("line", (line) => this.#record(n, line));
    try {
      const line = await within(START_MS, "printing its address", first);
      const match = /listening on (https?:\/\/[^\s]+)/.exec(line);
      if (!match) throw new Error(`unexpected first line from dolores: ${line}`);
      this.url = match[1].replace(/\/$/, "");
      this.port = Number(new URL(this.url).port);
      child.listening = true;
      this.agent = new Agent({
        connect: o.tls ? { ca: readFileSync(o.tls.cert) } : undefined,
        headersTimeout: WAIT_MS,
        bodyTimeout: WAIT_MS,
      });
      await within(START_MS, "answering /healthz", this.#healthy(child));
    } catch (error) {
      // Nothing of a process that did not come up stays: not it, not its pool.
      await this.#signal("SIGKILL");
      throw this.#failure(`dolores (incarnation ${n}) did not start: ${error.message}`, error);
    }
  }

  /** Resolves once `/healthz` answers 200 through this incarnation's agent, while
   * `child` is alive; rejects when it exits first. */
  async #healthy(child) {
    for (;;) {
      if (child.exitCode !== null || child.signalCode !== null) {
        throw new Error(`exited with ${describeExit(child.exitCode, child.signalCode)} before /healthz answered`);
      }
      try {
        const answer = await this.#send("GET", "/healthz", {});
        if (answer.status === 200 && child.exitCode === null && child.signalCode === null) return;
      } catch {
        // not answering yet
      }
      await sleep(50);
    }
  }

  #record(n, line) {
    this.log.push(`[${n}] ${line}`);
    if (this.log.length > LOG_LINES) this.log.splice(0, this.log.length - LOG_LINES);
  }

  /** An Error saying `message`, the state of the process and the server's log. */
  #failure(message, cause) {
    const child = this.child;
    const state = !child ? "never started"
      : child.exitCode !== null || child.signalCode !== null ? `exited with ${describeExit(child.exitCode, child.signalCode)}`
        : `running as pid ${child.pid}`;
    const log = this.log.length ? this.log.join("\n") : "(empty)";
    return new Error(`${message}\n-- dolores (${(this.options.command || [doloresBin]).join(" ")}, incarnation ${this.incarnation}, ${state}); its log:\n${log}\n--`, { cause });
  }

  /** SIGKILL: no flush, no goodbye. */
  async kill() {
    await this.#signal("SIGKILL");
  }

  /** SIGTERM: a clean shutdown; resolves with the exit code. */
  async stop() {
    return this.#signal("SIGTERM");
  }

  async #signal(signal) {
    const child = this.child;
    const agent = this.agent;
    this.agent = null;
    if (child) {
      child.onPurpose = true;
      // (no pid: it never ran, and there is no exit to wait for)
      if (child.pid !== undefined && child.exitCode === null && child.signalCode === null) {
        child.kill(signal);
        const timer = setTimeout(() => child.kill("SIGKILL"), 10000);
        await child.exited;
        clearTimeout(timer);
      }
    }
    // Its pool goes with it: the next incarnation's requests open new connections.
    if (agent) await agent.destroy().catch(() => {});
    return child && child.exitCode;
  }

  /** Starts again on the same port with the same settings (and data dir). The port
   * may take a moment to be free again after a kill. */
  async restart() {
    if (this.child && this.child.exitCode === null && this.child.signalCode === null) {
      throw this.#failure("restart() while the server is still running: kill() or stop() it first");
    }
    // A process that exited by itself still has its pool: drop it (the exit stays on
    // record for close()).
    await this.#signal("SIGKILL");
    let lastError;
    for (let i = 0; i < 50; i += 1) {
      try {
        await this.#spawn();
        return;
      } catch (error) {
        lastError = error;
        await sleep(100);
      }
    }
    throw lastError;
  }

  /** One request through this incarnation's agent; resolves with `{status, headers, text}`. */
  async #send(method, route, { headers = {}, body }) {
    if (!this.agent) throw new Error("the server is not running (killed or stopped, and not restarted)");
    const answer = await undiciRequest(`${this.url}${route}`, { method, headers, body, dispatcher: this.agent });
    return { status: answer.statusCode, headers: answer.headers, text: await answer.body.text() };
  }

  /**
   * One HTTP request to the server, through this incarnation's own undici `Agent` (over
   * TLS it trusts the test's certificate, and only for this server: the certificate goes
   * to the agent, never to the process). Resolves with `{status, headers, text}`;
   * rejects with the server's log when the request fails.
   */
  async request(method, route, { headers = {}, body } = {}) {
    try {
      return await this.#send(method, route, { headers, body });
    } catch (error) {
      throw this.#failure(`${method} ${this.url}${route} failed: ${error.message}${error.code ? ` (${error.code})` : ""}`, error);
    }
  }

  async api(method, route, body) {
    const response = await this.request(method, route, {
      headers: { Authorization: `Bearer ${API_KEY}`, "Content-Type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = response.text;
    let json;
    try {
      json = JSON.parse(text);
    } catch {
      json = text;
    }
    if (response.status < 200 || response.status > 299) {
      const error = this.#failure(`${method} ${route} answered ${response.status}: ${text}`);
      error.status = response.status;
      error.body = json;
      throw error;
    }
    return json;
  }

  /** Waits until the server counts `count` open streams of transport `kind`; resolves with its stats. */
  async waitForStream(kind, count = 1) {
    const deadline = Date.now() + WAIT_MS;
    for (;;) {
      const stats = await this.api("GET", "/api/v1/stats");
      if (stats.streams && stats.streams[kind] >= count) return stats;
      if (Date.now() > deadline) throw this.#failure(`not ${count} open ${kind} streams on the server: ${JSON.stringify(stats)}`);
      await sleep(50);
    }
  }

  /** Publishes one message; resolves with its id once stored. */
  async update(track, message) {
    return (await this.api("POST", "/api/v1/update", { track, message })).id;
  }

  /** Publishes messages one after the other (so their order is the list's order). */
  async publish(track, messages) {
    const ids = [];
    for (const message of messages) ids.push(await this.update(track, message));
    return ids;
  }

  async connect(uid, track) {
    return this.api("POST", "/api/v1/connect", { uid, track });
  }

  /**
   * Stops the server (SIGTERM) and throws, with its log, when anything went wrong in
   * its life: a process that had been listening exited without being asked to (a crash,
   * a panic that took it down), SIGTERM did not end in exit code 0, or the log shows a
   * panic (a panicking task does not end the process). A kill() by the test is fine.
   */
  async close() {
    const child = this.child;
    const running = child && child.listening && child.exitCode === null && child.signalCode === null;
    const code = await this.stop();
    const problems = this.unexpectedExits.map(({ incarnation, code: c, signal }) =>
      `incarnation ${incarnation} exited by itself with ${describeExit(c, signal)}`);
    if (running && code !== 0) {
      problems.push(`SIGTERM ended in ${describeExit(child.exitCode, child.signalCode)}, not exit code 0`);
    }
    if (this.log.some((line) => /panicked at/.test(line))) problems.push("it panicked");
    if (problems.length) throw this.#failure(`dolores did not end well: ${problems.join("; ")}`);
  }
}

function describeExit(code, signal) {
  return code === null ? `signal ${signal}` : `code ${code}`;
}

/** Rejects with "took over `ms` ms `what`" when `promise` takes longer than `ms`. */
export function within(ms, what, promise) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`took over ${ms} ms ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/**
 * Runs every step, in order, even when some fail (so nothing is left running), then
 * throws what failed: for the `after`/`afterEach` hooks, which must not swallow a server
 * that ended badly.
 */
export async function runAll(steps) {
  const errors = [];
  for (const step of steps) {
    try {
      await step();
    } catch (error) {
      errors.push(error);
    }
  }
  if (errors.length === 1) throw errors[0];
  if (errors.length) throw new AggregateError(errors, errors.map((e) => e.message).join("\n\n"));
}

export function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function base64url(data) {
  return Buffer.from(data).toString("base64url");
}

/** An HS256 listener token signed here, so a test can make one that is already expired. */
export function signToken({ uid, tracks, exp, secret = TOKEN_SECRET }) {
  const header = base64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const claims = { sub: uid, exp };
  if (tracks) claims.tracks = tracks;
  const payload = base64url(JSON.stringify(claims));
  const signature = createHmac("sha256", secret).update(`${header}.${payload}`).digest("base64url");
  return `${header}.${payload}.${signature}`;
}

export const nowSeconds = () => Math.floor(Date.now() / 1000);

function readBody(request) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    request.on("data", (c) => chunks.push(c));
    request.on("end", () => resolve(Buffer.concat(chunks).toString()));
    request.on("error", reject);
  });
}

function sendJson(response, status, body) {
  response.writeHead(status, { "Content-Type": "application/json", "Cache-Control": "no-store" });
  response.end(JSON.stringify(body));
}

function cookies(request) {
  const out = {};
  for (const part of (request.headers.cookie || "").split(";")) {
    const eq = part.indexOf("=");
    if (eq > 0) out[part.slice(0, eq).trim()] = decodeURIComponent(part.slice(eq + 1).trim());
  }
  return out;
}

/**
 * The app, on its own origin: the test page, the client file, the connect and
 * disconnect views (Django-like: they check X-CSRFToken against the csrftoken cookie and
 * call the backend API), and a token view whose answers a test decides (`tokens`).
 */
export class PageServer {
  constructor() {
    this.dolores = null;
    this.calls = [];
    this.tokenCalls = [];
    /** (uid, callNumber) => token string; set by token tests. */
    this.tokens = null;
    /** Extra handlers by path prefix, for tests that fake a server on this origin. */
    this.routes = new Map();
    this.server = http.createServer((req, res) => {
      this.#handle(req, res).catch((error) => sendJson(res, 500, { error: { code: "test_server", message: String(error) } }));
    });
  }

  static async start() {
    const page = new PageServer();
    await new Promise((resolve) => page.server.listen(0, "127.0.0.1", resolve));
    page.origin = `http://127.0.0.1:${page.server.address().port}`;
    return page;
  }

  async #handle(req, res) {
    const url = new URL(req.url, this.origin);
    for (const [prefix, handler] of this.routes) {
      if (url.pathname.startsWith(prefix)) return handler(req, res, url);
    }
    if (req.method === "GET" && url.pathname === "/") {
      res.writeHead(200, {
        "Content-Type": "text/html; charset=utf-8",
        "Cache-Control": "no-store",
        "Set-Cookie": `csrftoken=${CSRF_TOKEN}; Path=/; SameSite=Lax`,
      });
      res.end(readFileSync(pageFile));
      return;
    }
    if (req.method === "GET" && url.pathname === "/client/dolores.js") {
      res.writeHead(200, { "Content-Type": "text/javascript; charset=utf-8", "Cache-Control": "no-store" });
      res.end(readFileSync(clientFile));
      return;
    }
    if (req.method === "GET" && url.pathname === "/favicon.ico") {
      res.writeHead(204);
      res.end();
      return;
    }
    const view = /^\/:(connect|disconnect)\/(.+)$/.exec(url.pathname);
    if (req.method === "POST" && view) {
      const track = view[2].split("/").map(decodeURIComponent).join("/");
      const body = JSON.parse((await readBody(req)) || "{}");
      this.calls.push({ view: view[1], track, uid: body.uid, csrf: req.headers["x-csrftoken"] || null });
      if (req.headers["x-csrftoken"] !== CSRF_TOKEN || cookies(req).csrftoken !== CSRF_TOKEN) {
        sendJson(res, 403, { error: { code: "csrf_failed", message: "CSRF token missing or wrong" } });
        return;
      }
      try {
        const answer = await this.dolores.api("POST", `/api/v1/${view[1]}`, { uid: body.uid, track });
        sendJson(res, 200, answer);
      } catch (error) {
        sendJson(res, error.status || 502, error.body || { error: { code: "backend", message: String(error) } });
      }
      return;
    }
    if (req.method === "GET" && url.pathname === "/token") {
      const uid = url.searchParams.get("uid");
      this.tokenCalls.push(uid);
      if (!this.tokens) {
        sendJson(res, 404, { error: { code: "no_tokens", message: "this test has no token view" } });
        return;
      }
      sendJson(res, 200, { token: this.tokens(uid, this.tokenCalls.length) });
      return;
    }
    sendJson(res, 404, { error: { code: "not_found", message: url.pathname } });
  }

  close() {
    this.server.closeAllConnections();
    return new Promise((resolve) => this.server.close(resolve));
  }
}

/**
 * A reverse proxy to dolores that stands for what sits between browsers and servers.
 * By default it holds back every Server-Sent Events response until it ends, like a proxy
 * or antivirus that buffers whole responses (`buffer: false` lets SSE through as it
 * comes). With `holdHeaders` it holds the status line and headers too; otherwise they go
 * through at once and only the body is held. WebSocket upgrades (`websocket`): "pass"
 * tunnels them; "refuse" answers 502, like a proxy that does not know upgrades; "close"
 * completes the handshake itself and closes the socket at once, like one that cuts
 * upgraded connections. Everything else passes through untouched. `requests` lists the
 * paths.
 */
export class BufferingProxy {
  constructor(target, { holdHeaders = false, buffer = true, websocket = "pass" } = {}) {
    if (!["pass", "refuse", "close"].includes(websocket)) throw new TypeError(`websocket: ${websocket}`);
    this.target = target;
    this.holdHeaders = holdHeaders;
    this.buffer = buffer;
    this.websocket = websocket;
    this.requests = [];
    this.tunnels = new Set();
    this.server = http.createServer((req, res) => this.#handle(req, res));
    this.server.on("upgrade", (req, socket, head) => this.#upgrade(req, socket, head));
  }

  static async start(target, options) {
    const proxy = new BufferingProxy(target, options);
    await new Promise((resolve) => proxy.server.listen(0, "127.0.0.1", resolve));
    proxy.url = `http://127.0.0.1:${proxy.server.address().port}`;
    return proxy;
  }

  #handle(req, res) {
    this.requests.push(req.url);
    const target = new URL(this.target());
    const upstream = http.request({
      host: target.hostname,
      port: target.port,
      method: req.method,
      path: req.url,
      headers: { ...req.headers, host: target.host },
    }, (answer) => {
      const sse = (answer.headers["content-type"] || "").startsWith("text/event-stream");
      if (!sse || !this.buffer) {
        res.writeHead(answer.statusCode, answer.headers);
        if (sse) res.flushHeaders();
        answer.pipe(res);
        return;
      }
      const held = [];
      if (!this.holdHeaders) {
        res.writeHead(answer.statusCode, answer.headers);
        res.flushHeaders();
      }
      answer.on("data", (chunk) => held.push(chunk));
      answer.on("end", () => {
        if (this.holdHeaders) res.writeHead(answer.statusCode, answer.headers);
        res.end(Buffer.concat(held));
      });
      answer.on("error", () => res.destroy());
    });
    upstream.on("error", () => res.destroy());
    res.on("close", () => upstream.destroy());
    req.pipe(upstream);
  }

  #upgrade(req, socket, head) {
    this.requests.push(req.url);
    socket.on("error", () => socket.destroy());
    if (this.websocket === "refuse") {
      const body = "this proxy does not do upgrades\n";
      socket.end(`HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nContent-Length: ${body.length}\r\nConnection: close\r\n\r\n${body}`);
      return;
    }
    if (this.websocket === "close") {
      const accept = createHash("sha1").update(`${req.headers["sec-websocket-key"]}258EAFA5-E914-47DA-95CA-C5AB0DC85B11`).digest("base64");
      socket.end(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${accept}\r\n\r\n`);
      return;
    }
    // A tunnel: the request as it came (Host rewritten), then bytes both ways.
    const target = new URL(this.target());
    const upstream = net.connect(Number(target.port), target.hostname, () => {
      const lines = [`${req.method} ${req.url} HTTP/1.1`];
      for (let i = 0; i < req.rawHeaders.length; i += 2) {
        const name = req.rawHeaders[i];
        lines.push(`${name}: ${name.toLowerCase() === "host" ? target.host : req.rawHeaders[i + 1]}`);
      }
      upstream.write(`${lines.join("\r\n")}\r\n\r\n`);
      if (head.length) upstream.write(head);
      upstream.pipe(socket);
      socket.pipe(upstream);
    });
    this.tunnels.add(socket).add(upstream);
    upstream.on("error", () => socket.destroy());
    upstream.on("close", () => {
      this.tunnels.delete(upstream);
      socket.destroy();
    });
    socket.on("close", () => {
      this.tunnels.delete(socket);
      upstream.destroy();
    });
  }

  close() {
    for (const socket of this.tunnels) socket.destroy();
    this.server.closeAllConnections();
    return new Promise((resolve) => this.server.close(resolve));
  }
}

/**
 * A self-signed certificate for 127.0.0.1 and localhost, made with openssl in `dir`;
 * resolves with the paths `{cert, key}` for `DoloresServer.start({tls})`.
 */
export function selfSignedCert(dir) {
  const cert = path.join(dir, "cert.pem");
  const key = path.join(dir, "key.pem");
  execFileSync("openssl", [
    "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
    "-keyout", key, "-out", cert,
  ], { stdio: ["ignore", "ignore", "pipe"] });
  return { cert, key };
}

/**
 * Debian's Chromium, headless. Never a downloaded browser. `ignoreCertificateErrors`
 * is for the tests that serve Dolores with a self-signed certificate, and only those.
 */
export async function launchBrowser({ ignoreCertificateErrors = false } = {}) {
  return chromium.launch({
    executablePath: process.env.CHROMIUM_BIN || "/usr/bin/chromium",
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--no-first-run",
      "--disable-quic",
      ...(ignoreCertificateErrors ? ["--ignore-certificate-errors"] : []),
    ],
  });
}

/**
 * Where the page imports the client from: the dolores server's own /dolores.js when it
 * serves one, else this repo's clients/js/dolores.js from the page server.
 * DOLORES_CLIENT=server|local forces one.
 */
export async function clientUrl(dolores, page) {
  const wanted = process.env.DOLORES_CLIENT;
  if (wanted === "local") return `${page.origin}/client/dolores.js`;
  const served = `${dolores.url}/dolores.js`;
  if (wanted === "server") return served;
  try {
    const response = await dolores.request("GET", "/dolores.js");
    if (response.status === 200 && /javascript/.test(response.headers["content-type"] || "")) return served;
  } catch {
    // fall through
  }
  return `${page.origin}/client/dolores.js`;
}

/**
 * A browser tab with the test page. `start(options, tracks)` makes a Dolores in the page
 * and connects it to `tracks`; what it receives, its statuses, errors and resets are
 * recorded in the page and read with `received()`, `state()`.
 */
export class TestPage {
  constructor(page, url) {
    this.page = page;
    this.url = url;
    this.consoleErrors = [];
    page.on("pageerror", (error) => this.consoleErrors.push(String(error)));
  }

  static async open(context, pageServer, client) {
    const page = await context.newPage();
    const url = `${pageServer.origin}/?client=${encodeURIComponent(client)}`;
    const testPage = new TestPage(page, url);
    await testPage.load();
    return testPage;
  }

  async load() {
    await this.page.goto(this.url);
    await this.page.waitForFunction(() => window.pageReady === true, null, { timeout: WAIT_MS });
  }

  async reload() {
    await this.page.reload();
    await this.page.waitForFunction(() => window.pageReady === true, null, { timeout: WAIT_MS });
  }

  /** Makes the Dolores and connects `tracks`; resolves with its uid. */
  async start(options, tracks = [":data"]) {
    return this.page.evaluate(([o, t]) => window.startDolores(o, t), [options, tracks]);
  }

  async received() {
    return this.page.evaluate(() => window.received.map((r) => r.message));
  }

  async state() {
    return this.page.evaluate(() => ({
      statuses: window.statuses,
      errors: window.errors,
      resets: window.resets,
      received: window.received,
      uid: window.dolores ? window.dolores.uid : null,
    }));
  }

  /** Waits until the page has received at least `n` messages; resolves with them all. */
  async waitForCount(n, timeout = WAIT_MS) {
    try {
      await this.page.waitForFunction((count) => window.received.length >= count, n, { timeout, polling: 50 });
    } catch (error) {
      const state = await this.state().catch(() => null);
      throw new Error(`page got ${state && state.received.length} of ${n} messages in ${timeout} ms: ${JSON.stringify(state)}`, { cause: error });
    }
    return this.received();
  }

  /** Waits until the page has received `last`; resolves with everything received. */
  async waitForLast(last) {
    await this.page.waitForFunction((m) => window.received.some((r) => r.message === m), last, { timeout: WAIT_MS, polling: 50 })
      .catch(async (error) => {
        throw new Error(`page never got ${last}: ${JSON.stringify(await this.state().catch(() => null))}`, { cause: error });
      });
    return this.received();
  }

  async waitForStatus(status, timeout = WAIT_MS) {
    await this.page.waitForFunction((s) => window.statuses[window.statuses.length - 1] === s, status, { timeout, polling: 50 })
      .catch(async (error) => {
        throw new Error(`page status never became ${status}: ${JSON.stringify(await this.state().catch(() => null))}`, { cause: error });
      });
  }

  async waitForError(timeout = WAIT_MS) {
    await this.page.waitForFunction(() => window.errors.length > 0, null, { timeout, polling: 50 })
      .catch(async (error) => {
        throw new Error(`page saw no error: ${JSON.stringify(await this.state().catch(() => null))}`, { cause: error });
      });
    return (await this.state()).errors;
  }
}

/** `count` distinct messages, tagged so two runs never mix. */
export function messages(tag, count, from = 1) {
  return Array.from({ length: count }, (_, i) => `${tag}-${from + i}`);
}
