// A stand-in for the dolores binary, for the harness's own tests (test/harness.test.js):
// it takes `serve --listen HOST:PORT …` like dolores, prints the same "listening on" line,
// and misbehaves on request, so the tests can see the harness notice each kind of bad end.
//   --healthy-after MS   /healthz answers 503 until MS after the start (then 200)
//   --term-code N        SIGTERM exits with code N (default 0)
//   POST /exit           exits with code 7 at once, as a crash would
//   POST /panic          writes a Rust panic message to stderr and goes on serving
import http from "node:http";

const args = process.argv.slice(2);
const option = (name, fallback) => {
  const i = args.indexOf(name);
  return i < 0 ? fallback : args[i + 1];
};
const [host, port] = option("--listen", "127.0.0.1:0").split(":");
const healthyAt = Date.now() + Number(option("--healthy-after", "0"));
const termCode = Number(option("--term-code", "0"));

const server = http.createServer((req, res) => {
  const json = (status, body) => {
    res.writeHead(status, { "Content-Type": "application/json" });
    res.end(JSON.stringify(body));
  };
  if (req.url === "/healthz") {
    if (Date.now() < healthyAt) json(503, { status: "starting" });
    else json(200, { status: "ok" });
  } else if (req.method === "POST" && req.url === "/exit") {
    process.stderr.write("fake: exiting with 7 as asked\n");
    process.exit(7);
  } else if (req.method === "POST" && req.url === "/panic") {
    process.stderr.write("thread 'tokio-runtime-worker' panicked at src/fake.rs:1:1:\nfake boom\n");
    json(200, {});
  } else if (req.url === "/api/v1/stats") {
    json(200, { streams: {} });
  } else {
    json(404, { error: { code: "not_found", message: req.url } });
  }
});
server.listen(Number(port), host, () => {
  process.stdout.write(`fake dolores listening on http://${host}:${server.address().port}/\n`);
});
process.on("SIGTERM", () => {
  process.stderr.write(`fake: SIGTERM, exiting with ${termCode}\n`);
  server.closeAllConnections();
  server.close(() => process.exit(termCode));
});
