// The JS client's types: tsc checks clients/js/dolores.js itself (`// @ts-check`, JSDoc,
// strict), compiles types/usage.ts against clients/js/dolores.d.ts, and lib/typecheck.js
// holds the .d.ts against the .js export by export and member by member — so the types an
// app imports cannot drift from the code. No browser, no server.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { createRequire } from "node:module";
import path from "node:path";
import { test } from "node:test";

import { compareTypes, sources } from "../lib/typecheck.js";

const here = path.dirname(new URL(import.meta.url).pathname);
const tsc = createRequire(import.meta.url).resolve("typescript/bin/tsc");

/** Runs tsc with `args` from tests/browser; resolves with its exit code and output. */
function runTsc(...args) {
  return new Promise((resolve) => {
    execFile(process.execPath, [tsc, ...args], { cwd: path.join(here, ".."), timeout: 60000 }, (error, stdout, stderr) => {
      resolve({ code: error ? error.code : 0, output: `${stdout}${stderr}` });
    });
  });
}

test("tsc --checkJs finds no error in clients/js/dolores.js", { timeout: 90000 }, async () => {
  const { code, output } = await runTsc("-p", "types/tsconfig.json");
  assert.equal(code, 0, `tsc -p types/tsconfig.json:\n${output}`);
});

test("an app's use of every export and member compiles against clients/js/dolores.d.ts", { timeout: 90000 }, async () => {
  const { code, output } = await runTsc("-p", "types/tsconfig.usage.json");
  assert.equal(code, 0, `tsc -p types/tsconfig.usage.json:\n${output}`);
});

test("dolores.d.ts and dolores.js declare the same exports, members and types", { timeout: 90000 }, () => {
  assert.deepEqual(compareTypes(), []);
});

test("the comparison catches a drift either way", { timeout: 90000 }, () => {
  const { js, dts } = sources();
  const change = (text, from, to) => {
    assert.ok(text.includes(from), `the file no longer has ${JSON.stringify(from)}: update this test`);
    return text.replace(from, to);
  };
  const cases = [
    [{ js: change(js, "  close() {", "  ping() {}\n\n  close() {") }, /member ping is in dolores\.js, not in dolores\.d\.ts/],
    [{ dts: change(dts, "  close(): void;", "") }, /member close is in dolores\.js, not in dolores\.d\.ts/],
    [{ dts: change(dts, "connect(track: string,", "connect(track: number,") }, /Dolores#connect, parameter 1 \(track\): dolores\.js string, dolores\.d\.ts number/],
    [{ dts: change(dts, "disconnect(track: string): Promise<void>;", "disconnect(track: string): void;") }, /Dolores#disconnect returns Promise<void> in dolores\.js, void in dolores\.d\.ts/],
    [{ dts: change(dts, '"connecting" | "open" | "closed";', '"connecting" | "open";') }, /type Status differs/],
    [{ dts: change(dts, "readonly uid: string;", "uid: string;") }, /Dolores#uid is read-only in dolores\.js, not in dolores\.d\.ts/],
    [{ dts: change(dts, "  on(event: \"error\", listener: (error: DoloresError) => void): () => void;\n", "") }, /Dolores#on: 3 signature\(s\) in dolores\.js, 2 in dolores\.d\.ts/],
    [{ dts: change(dts, "constructor(options?: DoloresOptions);", "constructor(options: DoloresOptions);") }, /new Dolores, parameter 1 \(options\) is optional in dolores\.js, required in dolores\.d\.ts/],
    [{ dts: change(dts, "  fatal?: boolean;", "  fatal?: boolean;\n  retryable?: boolean;") }, /type DoloresError differs/],
    [{ js: change(js, "/** @typedef {(track: string, message: Json) => void} MessageCallback */", "") }, /dolores\.d\.ts exports MessageCallback, dolores\.js does not/],
    [{ js: change(js, "export class Dolores {", "/** @typedef {number} Extra */\n\nexport class Dolores {") }, /dolores\.js declares type Extra, dolores\.d\.ts does not/],
  ];
  for (const [texts, expected] of cases) {
    const problems = compareTypes(texts).join("\n");
    assert.match(problems, expected, `altered ${Object.keys(texts)}: ${problems || "no problem found"}`);
  }
});
