// Real nginx and real Caddy in front of dolores, run with the very files in deploy/
// (ports filled in), each our own process on a free loopback port with its own temp dir
// for config, pid, logs and state — never the system service. tests/proxy.rs does the
// same from Rust.

import { spawn } from "node:child_process";
import { existsSync, openSync, readFileSync, writeFileSync } from "node:fs";
import net from "node:net";
import path from "node:path";

import { repoRoot, sleep, tempDir } from "./harness.js";

/** `text` with every `from` replaced; throws when there is none, so a deploy file that
 * changed shape is noticed rather than silently left untested. */
function substitute(text, from, to) {
  if (!text.includes(from)) throw new Error(`the deploy file has no ${JSON.stringify(from)}`);
  return text.split(from).join(to);
}

export function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

function accepts(port) {
  return new Promise((resolve) => {
    const socket = net.connect(port, "127.0.0.1");
    socket.once("connect", () => {
      socket.destroy();
      resolve(true);
    });
    socket.once("error", () => resolve(false));
  });
}

function program(name) {
  for (const dir of [...(process.env.PATH || "").split(":"), "/usr/sbin"]) {
    const file = path.join(dir, name);
    if (dir && existsSync(file)) return file;
  }
  throw new Error(`${name} is not installed: apt-get install nginx-light caddy (tests/browser/install.sh does)`);
}

/**
 * Starts `kind` ("nginx" | "caddy") with deploy/`file`, Dolores at `dolores` and the
 * app at `app` (both `host:port`). Resolves with `{ origin, port, logs(), close() }`.
 */
export async function startProxy(kind, file, { dolores, app, port }) {
  const temp = tempDir();
  let text = readFileSync(path.join(repoRoot, "deploy", file), "utf8");
  text = substitute(text, "127.0.0.1:8007", dolores);
  if (text.includes("127.0.0.1:8000")) text = substitute(text, "127.0.0.1:8000", app);
  const log = openSync(path.join(temp.dir, "stderr.log"), "w");
  let command;
  let args;
  let env = process.env;
  if (kind === "nginx") {
    writeFileSync(path.join(temp.dir, "site.conf"), substitute(text, "listen 80;", `listen 127.0.0.1:${port};`));
    const d = temp.dir;
    writeFileSync(path.join(d, "nginx.conf"), [
      `pid ${d}/nginx.pid;`,
      `error_log ${d}/error.log info;`,
      "master_process off; # one process, no workers: nothing outlives it",
      "events { worker_connections 512; }",
      "http {",
      `  access_log ${d}/access.log;`,
      `  client_body_temp_path ${d}/body;`,
      `  proxy_temp_path ${d}/proxy;`,
      `  fastcgi_temp_path ${d}/fastcgi;`,
      `  uwsgi_temp_path ${d}/uwsgi;`,
      `  scgi_temp_path ${d}/scgi;`,
      `  include ${d}/site.conf;`,
      "}",
      "",
    ].join("\n"));
    command = program("nginx");
    args = ["-p", d, "-e", `${d}/error.log`, "-c", `${d}/nginx.conf`, "-g", "daemon off;"];
  } else {
    const host = ["app.example.com {", "push.example.com {"].find((h) => text.includes(h));
    if (!host) throw new Error(`no site address in deploy/${file}`);
    const site = substitute(text, host, `http://127.0.0.1:${port} {`);
    const config = path.join(temp.dir, "Caddyfile");
    // Global options for a test: no admin endpoint, no certificates.
    writeFileSync(config, `{\n\tadmin off\n\tauto_https off\n}\n\n${site}`);
    command = program("caddy");
    args = ["run", "--adapter", "caddyfile", "--config", config];
    env = { ...process.env, HOME: temp.dir, XDG_DATA_HOME: `${temp.dir}/data`, XDG_CONFIG_HOME: `${temp.dir}/config` };
  }
  const child = spawn(command, args, { env, stdio: ["ignore", log, log] });
  const logs = () => ["stderr.log", "error.log"]
    .map((f) => (existsSync(path.join(temp.dir, f)) ? readFileSync(path.join(temp.dir, f), "utf8") : ""))
    .join("\n");
  const exited = new Promise((resolve) => child.once("exit", resolve));
  const close = async () => {
    if (child.exitCode === null && child.signalCode === null) {
      // nginx stops at once on SIGTERM; Caddy would wait for open streams to end.
      child.kill(kind === "nginx" ? "SIGTERM" : "SIGKILL");
      const timer = setTimeout(() => child.kill("SIGKILL"), 5000);
      await exited;
      clearTimeout(timer);
    }
    temp.remove();
  };
  const deadline = Date.now() + 10000;
  while (!(await accepts(port))) {
    if (child.exitCode !== null) {
      const message = `${kind} exited with ${child.exitCode}: ${logs()}`;
      await close();
      throw new Error(message);
    }
    if (Date.now() > deadline) {
      const message = `${kind} did not listen in 10 s: ${logs()}`;
      await close();
      throw new Error(message);
    }
    await sleep(20);
  }
  return { origin: `http://127.0.0.1:${port}`, port, logs, close };
}
