// The JS client's name rules against tests/vectors/names.json, the cases the Rust server
// and the Python client are held to as well. Plain Node: no browser, no server.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

const vectors = JSON.parse(readFileSync(new URL("../../vectors/names.json", import.meta.url), "utf8"));

/** A sessionStorage stand-in: the client keeps its uid there, and Node has none. */
class MemoryStorage {
  #items = new Map();
  getItem(key) { return this.#items.has(key) ? this.#items.get(key) : null; }
  setItem(key, value) { this.#items.set(key, String(value)); }
  removeItem(key) { this.#items.delete(key); }
}

globalThis.sessionStorage = new MemoryStorage();
const { Dolores } = await import("../../../clients/js/dolores.js");
const server = "http://127.0.0.1:9";

test("track names: the client takes exactly the tracks of tests/vectors/names.json marked valid", async () => {
  assert.ok(vectors.tracks.length > 0);
  // Without a disconnectUrl, disconnect only checks the name and forgets its callbacks:
  // nothing goes over the network.
  const dolores = new Dolores({ server, transport: "poll" });
  try {
    for (const { name, valid, why } of vectors.tracks) {
      const outcome = await dolores.disconnect(name).then(() => "accepted", (error) => {
        assert.ok(error instanceof TypeError, `${JSON.stringify(name)}: ${error}`);
        return "refused";
      });
      assert.equal(outcome, valid ? "accepted" : "refused", `${JSON.stringify(name)}: ${why}`);
    }
  } finally {
    dolores.close();
  }
});

test("track names: a lone surrogate (no UTF-8 for it) is refused", async () => {
  const dolores = new Dolores({ server, transport: "poll" });
  try {
    await assert.rejects(dolores.disconnect("a\ud800b"), TypeError);
  } finally {
    dolores.close();
  }
});

test("uids: a saved uid is kept exactly when tests/vectors/names.json says it is valid", () => {
  assert.ok(vectors.uids.length > 0);
  for (const { name, valid, why } of vectors.uids) {
    globalThis.sessionStorage = new MemoryStorage();
    globalThis.sessionStorage.setItem(`dolores:${server}`, JSON.stringify({ uid: name, last: null }));
    const dolores = new Dolores({ server, transport: "poll" });
    try {
      assert.equal(dolores.uid === name, valid, `${JSON.stringify(name)}: ${why}`);
    } finally {
      dolores.close();
    }
  }
});
