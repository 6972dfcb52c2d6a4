// @ts-check
// Dolores — the browser client. One ES module, no dependencies.
//
//   import { Dolores } from "http://127.0.0.1:8007/dolores.js";
//   const dolores = new Dolores({ server: "http://127.0.0.1:8007", connectUrl: "/:connect/" });
//   await dolores.connect(":data", (track, message) => { … });
//
// How it works, in short (README.md has the long version):
// - The listener's uid is random (crypto.getRandomValues) and kept in sessionStorage with
//   the id of the last event delivered, so a reload resumes the same queue exactly.
// - One stream carries every track. After any drop the client reconnects and names its
//   last event id (`?last_event_id=`): the server sends what follows, no gap, no duplicate.
// - "auto" opens a WebSocket: browsers do not count WebSockets against the six HTTP/1.1
//   connections per host that all tabs share, so any number of tabs can each hold a
//   stream. Where a WebSocket cannot get through it falls back to SSE, and where SSE is
//   held back, to long-polling; a fallback is kept for the tab's session.
// - "sse" reads Server-Sent Events through fetch() and a stream reader, not EventSource:
//   fetch shows the HTTP status and the error body (EventSource hides both, so it cannot
//   tell an expired token from a dead server) and sees every byte, comments included —
//   which is how "auto" notices a buffering proxy (headers come, bytes do not) and falls
//   back to long-polling.
// - Failures back off exponentially with jitter; 401/404 stop the client and say why,
//   except an expired or revoked token (the app disconnected the listener), which is
//   fetched again from the `token(uid)` option.
//
// Types: `// @ts-check` and the JSDoc below are checked by tsc (tests/browser/types/), and
// dolores.d.ts, the types an app imports, is checked against them (test/types.test.js).

/** Any JSON value: what the app's backend published with `update(track, message)`.
 * @typedef {string | number | boolean | null | JsonArray | {[key: string]: Json}} Json */

/** (Its own name: tsc takes `Json[]` inside the union above as a circular alias.)
 * @typedef {Json[]} JsonArray */

/** "connecting", "open" or "closed" (after close() or an error the client cannot fix).
 * @typedef {"connecting" | "open" | "closed"} Status */

/** How the client reaches the server; "auto" (the default) goes WebSocket → SSE → polling.
 * @typedef {"auto" | "sse" | "ws" | "poll"} Transport */

/**
 * @typedef {object} DoloresOptions
 * @property {string} [server] where Dolores listens; defaults to where this module came from
 * @property {string} [connectUrl] the app's connect view: POST {"uid"} to connectUrl + track
 * @property {string} [disconnectUrl] the app's disconnect view, the same way
 * @property {string | ((uid: string) => string | Promise<string>)} [token] listener token,
 *   or a function of the uid that makes one (called again when it has expired or was revoked)
 * @property {Transport} [transport] default "auto"
 */

/**
 * What on("error") reports and connect()/disconnect() reject with: `code` is the
 * server's, the app's or the client's own; `fatal` when the client stopped because of it.
 * @typedef {Error & {name: "DoloresError", code: string, status?: number, closeCode?: number, fatal?: boolean}} DoloresError
 */

/** @typedef {(track: string, message: Json) => void} MessageCallback */

/**
 * What one connection attempt came to (the outcome kinds); `#run` decides what follows:
 * - "retry": try again after a backoff — `opened` when it had got through first,
 *   `network` when the server was not reached, `wsMiss` when a WebSocket never opened;
 * - "ended": the server ended an open stream on purpose (come back after `retry:`);
 * - "fatal": stop and report `error`;
 * - "token_expired", "token_revoked": get a new token and try again;
 * - "bad_cursor": the server cannot read the saved event id: drop it, emit "reset";
 * - "fallback": "auto" saw SSE held back: long-polling from now on;
 * - "primed": the first immediate poll of a listener without a cursor is done;
 * - "aborted": stopped from here (close(), a new start()).
 * @typedef {{opened?: boolean, network?: boolean, wsMiss?: boolean, cause?: unknown}
 *   & ({kind: "retry" | "ended" | "token_expired" | "token_revoked" | "bad_cursor" | "fallback" | "primed" | "aborted"}
 *     | {kind: "fatal", error: DoloresError})} Outcome
 */

/** @typedef {"reset" | "status" | "error"} EventName */

/**
 * What this module keeps in sessionStorage per server (`dolores:<server>`).
 * @typedef {{uid: string, last: string | null, wsBlocked?: boolean, sseBlocked?: boolean}} Saved
 */

const UID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
/** 32 characters of a 64-letter alphabet: 192 random bits, unguessable. */
const UID_LENGTH = 32;
const UID_PATTERN = /^[A-Za-z0-9._-]{8,128}$/;

/** An SSE response's headers must come within this long, or SSE is taken as blocked. */
const SSE_HEADERS_TIMEOUT_MS = 8000;
/** After the headers, the first bytes must follow within this long. The server writes
 * `retry:` and a `: welcome` comment at once, so only something in between that holds
 * the body back (a buffering proxy, an antivirus) makes them late. */
const SSE_FIRST_BYTES_TIMEOUT_MS = 3000;
/** An open stream silent this long is taken as dead (a half-open connection after a
 * sleep or a network change) and reopened. 2.5 × the server's default 20 s heartbeat. */
const SSE_IDLE_TIMEOUT_MS = 50000;
/** How long the server holds a long-poll request open without news, in seconds. Under
 * the 30 s after which many proxies and load balancers cut idle requests. */
const POLL_TIMEOUT_S = 25;
/** Extra time a poll answer may take past its timeout before it is given up. */
const POLL_GRACE_MS = 10000;
/** An empty poll answer that comes back faster than this (something cut the request
 * short) waits for the rest of it before the next request, so the client never spins. */
const POLL_MIN_INTERVAL_MS = 1000;
/** A WebSocket counts as open once it has lived this long (or brought a frame): the
 * server refuses a bad token or an unknown listener by closing right after the upgrade. */
const WS_OPEN_GRACE_MS = 300;
/** "auto": WebSocket attempts in a row that never open before SSE is tried. One is not
 * enough to judge: a server restarting fails the same way as a proxy refusing upgrades. */
const WS_MISSES_BEFORE_SSE = 2;
/** Reconnect delays grow from the first to the most, doubling, each with jitter. */
const BACKOFF_FIRST_MS = 500;
const BACKOFF_MAX_MS = 30000;
/** The server's `retry:` default: the pause before coming back after it ended a stream. */
const DEFAULT_RETRY_MS = 2000;
/** Token refreshes in a row that still end in `token_expired` or `token_revoked` before
 * giving up. Three, with the backoff before each after a revocation, span more than a
 * second: a token minted in the very second of the disconnect is refused too (`iat`
 * counts whole seconds), so the last try gets one from a later second. */
const MAX_TOKEN_REFRESHES = 3;
/** Failed connection attempts in a row before an `unreachable` error is reported (the
 * client keeps trying; a wrong `server` or a missing CORS origin looks like this). */
const UNREACHABLE_AFTER = 3;
/** Messages kept for tracks that have no callback yet (after a reload, the queue may
 * bring messages of a track before the app has called connect() for it again). */
const MAX_HELD_MESSAGES = 1000;

/** @type {Set<unknown>} */
const STATUSES = new Set(["connecting", "open", "closed"]);
/** @type {readonly unknown[]} */
const EVENTS = ["reset", "status", "error"];
/** @type {Set<unknown>} */
const TRANSPORTS = new Set(["auto", "sse", "ws", "poll"]);

/**
 * Errors the client reports: `code` is the server's (or the app's) error code.
 * @param {string} code
 * @param {string} [message]
 * @param {{status?: number, closeCode?: number, fatal?: boolean, cause?: unknown}} [extra]
 * @returns {DoloresError}
 */
function doloresError(code, message, extra = {}) {
  const error = new Error(message || code);
  error.name = "DoloresError";
  return /** @type {DoloresError} */ (Object.assign(error, { code }, extra));
}

/**
 * Browsers with `reportError` log an exception without stopping the caller's loop.
 * @param {unknown} error
 */
function report(error) {
  if (typeof globalThis.reportError === "function") globalThis.reportError(error);
  else setTimeout(() => { throw error; });
}

function makeUid() {
  const bytes = new Uint8Array(UID_LENGTH);
  globalThis.crypto.getRandomValues(bytes);
  // 256 is a multiple of 64, so `b & 63` is uniform.
  return Array.from(bytes, (b) => UID_ALPHABET[b & 63]).join("");
}

/** No control character (Unicode Cc: C0, DEL and C1), no whitespace (Unicode White_Space,
 * which is not JS's `\s`: that one takes U+FEFF and leaves out U+0085), and no lone
 * surrogate (it cannot be sent as UTF-8). tests/vectors/names.json holds the cases. */
const TRACK_REFUSED = /[\p{Cc}\p{Cs}\p{White_Space}]/u;
/** Longest track, in bytes of UTF-8 (the server's limit). */
const MAX_TRACK_BYTES = 256;

/** @param {unknown} track */
function checkTrack(track) {
  if (typeof track !== "string" || track.length === 0 || TRACK_REFUSED.test(track)
      || new TextEncoder().encode(track).length > MAX_TRACK_BYTES) {
    throw new TypeError(`not a track name: ${JSON.stringify(track)}`);
  }
}

/** The track as URL path segments: slashes stay slashes, `:` and friends stay readable,
 * `?`, `#`, `%` and non-ASCII are escaped.
 * @param {string} track */
function trackPath(track) {
  return track.split("/").map((part) => encodeURIComponent(part)
    .replace(/%(3A|40|3B|2C|3D|2B|24|26)/gi, (s) => decodeURIComponent(s))).join("/");
}

/** True when `id` is not after `last`. Ids are opaque, but the server's grow in publish
 * order; when both are decimal numbers this guards against a duplicate.
 * @param {string} id
 * @param {string | null} last */
function notAfter(id, last) {
  if (last == null || !/^\d+$/.test(id) || !/^\d+$/.test(last)) return false;
  const a = id.replace(/^0+(?=\d)/, "");
  const b = last.replace(/^0+(?=\d)/, "");
  return a.length < b.length || (a.length === b.length && a <= b);
}

/** @param {number} ms */
function jitter(ms) {
  return Math.round(ms * (0.5 + Math.random() / 2));
}

/** @param {string} name */
function readCookie(name) {
  if (typeof document === "undefined" || !document.cookie) return null;
  for (const part of document.cookie.split(";")) {
    const eq = part.indexOf("=");
    if (eq > 0 && part.slice(0, eq).trim() === name) {
      return decodeURIComponent(part.slice(eq + 1).trim());
    }
  }
  return null;
}

/** sessionStorage, or nothing where it is unavailable (sandboxed frames, some private modes).
 * @returns {Storage | null} */
function storage() {
  try {
    const s = globalThis.sessionStorage;
    const probe = "dolores:probe";
    s.setItem(probe, "1");
    s.removeItem(probe);
    return s;
  } catch {
    return null;
  }
}

/** The server's base URL, no trailing slash: `server` (a path like "/dolores" is taken
 * on the page's origin), else the folder this module was served from — the server
 * itself, under its base path when it has one (https://app.example/dolores/dolores.js). */
/** @param {string | undefined} server */
function serverUrl(server) {
  try {
    const base = server ? (globalThis.location ? globalThis.location.href : undefined) : import.meta.url;
    return new URL(server || ".", base).href.replace(/\/+$/, "");
  } catch {
    return String(server || (globalThis.location ? globalThis.location.origin : "")).replace(/\/+$/, "");
  }
}

/** The `{code, message}` of a Dolores (or app) JSON error answer, else null.
 * @param {Response} response
 * @returns {Promise<{code: string, message: string} | null>} */
async function errorCode(response) {
  try {
    const body = await response.json();
    return body && body.error && typeof body.error.code === "string" ? body.error : null;
  } catch {
    return null;
  }
}

/**
 * A listener: one stream from a Dolores server for all the tracks it is connected to.
 */
export class Dolores {
  /** @type {string} */
  #server;
  /** @type {string | null} */
  #connectUrl;
  /** @type {string | null} */
  #disconnectUrl;
  /** @type {string | ((uid: string) => string | Promise<string>) | null} */
  #tokenOption;
  /** @type {Transport} */
  #transportOption;
  /** @type {"sse" | "ws" | "poll"} */
  #mode;
  /** @type {Storage | null} */
  #store;
  /** @type {string} */
  #storeKey;
  /** @type {string} */
  #uid;
  /** @type {string | null} */
  #lastId = null;
  /** @type {string | null} */
  #token = null;
  /** @type {Map<string, Set<MessageCallback>>} */
  #callbacks = new Map();
  /** @type {Map<string, Json[]>} */
  #held = new Map();
  #heldCount = 0;
  /** @type {Set<string>} */
  #dropped = new Set();
  /** @type {Record<EventName, Set<Function>>} */
  #handlers = { reset: new Set(), status: new Set(), error: new Set() };
  /** @type {Status} */
  #status = "closed";
  #running = false;
  #generation = 0;
  #closed = false;
  /** @type {AbortController | null} */
  #controller = null;
  /** @type {(() => void) | null} */
  #wake = null;
  #failures = 0;
  #tokenRefreshes = 0;
  #retryMs = DEFAULT_RETRY_MS;
  /** "auto": WebSocket attempts in a row that never opened. */
  #wsMisses = 0;
  /** "auto": SSE is being tried because WebSockets failed; it must open to prove that
   * WebSockets, not the server, are the problem. */
  #sseTrial = false;
  /** "auto": WebSockets do not get through to this server (kept for the session). */
  #wsBlocked = false;
  #onOnline = () => this.#wake && this.#wake();

  /**
   * @param {DoloresOptions} [options] server, connectUrl, disconnectUrl, token, transport
   */
  constructor(options = {}) {
    const transport = options.transport || "auto";
    if (!TRANSPORTS.has(transport)) {
      throw new TypeError(`transport must be "auto", "sse", "ws" or "poll", not ${JSON.stringify(transport)}`);
    }
    this.#server = serverUrl(options.server);
    this.#connectUrl = options.connectUrl || null;
    this.#disconnectUrl = options.disconnectUrl || null;
    this.#tokenOption = options.token || null;
    this.#transportOption = transport;

    this.#store = storage();
    this.#storeKey = `dolores:${this.#server}`;
    /** @type {Partial<Saved> | null} */
    let saved = null;
    try {
      // (JSON.parse(null) is null: nothing saved)
      saved = JSON.parse(/** @type {string} */ (this.#store && this.#store.getItem(this.#storeKey)));
    } catch {
      saved = null;
    }
    if (saved && typeof saved.uid === "string" && UID_PATTERN.test(saved.uid)) {
      this.#uid = saved.uid;
      this.#lastId = typeof saved.last === "string" ? saved.last : null;
    } else {
      this.#uid = makeUid();
    }
    this.#wsBlocked = Boolean(saved && saved.wsBlocked);
    this.#mode = this.#firstMode(saved && saved.sseBlocked);
    this.#save();
  }

  /** The listener's uid (kept in sessionStorage, so a reload resumes the same queue). */
  get uid() {
    return this.#uid;
  }

  /**
   * Subscribes this listener to `track` through the app's connect view (when there is a
   * `connectUrl`) and calls `callback(track, message)` for each of its messages. Opens
   * the stream on the first call. Rejects with the app's error when the view says no.
   * @param {string} track
   * @param {MessageCallback} callback
   * @returns {Promise<void>}
   */
  async connect(track, callback) {
    checkTrack(track);
    if (typeof callback !== "function") throw new TypeError("connect(track, callback): callback must be a function");
    if (this.#closed) throw doloresError("closed", "this Dolores was closed");
    let callbacks = this.#callbacks.get(track);
    if (!callbacks) this.#callbacks.set(track, (callbacks = new Set()));
    callbacks.add(callback);
    this.#dropped.delete(track);
    if (this.#held.has(track)) queueMicrotask(() => this.#releaseHeld(track));
    if (this.#connectUrl) {
      try {
        await this.#post(this.#connectUrl, track);
      } catch (error) {
        callbacks.delete(callback);
        if (!callbacks.size) this.#callbacks.delete(track);
        throw error;
      }
    }
    if (!this.#closed) this.#start();
  }

  /** Stops the callbacks of `track` and unsubscribes it through the app's disconnect view.
   * @param {string} track
   * @returns {Promise<void>} */
  async disconnect(track) {
    checkTrack(track);
    this.#callbacks.delete(track);
    this.#dropHeld(track);
    this.#dropped.add(track);
    if (this.#disconnectUrl) await this.#post(this.#disconnectUrl, track);
  }

  /**
   * @overload
   * @param {"reset"} event
   * @param {() => void} listener
   * @returns {() => void}
   */
  /**
   * @overload
   * @param {"status"} event
   * @param {(status: Status) => void} listener
   * @returns {() => void}
   */
  /**
   * @overload
   * @param {"error"} event
   * @param {(error: DoloresError) => void} listener
   * @returns {() => void}
   */
  /**
   * Listens to "reset" (reload your state: something was too old to replay), "status"
   * ("connecting" | "open" | "closed") or "error" (an Error with `code`; `fatal` when the
   * client stopped because of it). Returns a function that removes the listener.
   * @param {EventName} event
   * @param {Function} fn
   * @returns {() => void}
   */
  on(event, fn) {
    if (!EVENTS.includes(event)) throw new TypeError(`on(event): event is one of ${EVENTS.join(", ")}`);
    if (typeof fn !== "function") throw new TypeError("on(event, fn): fn must be a function");
    this.#handlers[event].add(fn);
    return () => this.#handlers[event].delete(fn);
  }

  /** Closes the stream for good. The listener stays on the server: a new page with the
   * same session resumes its queue. */
  close() {
    if (this.#closed) return;
    this.#closed = true;
    this.#stopRunning();
    this.#setStatus("closed");
  }

  // ---- the connection loop -------------------------------------------------------

  /** @param {boolean | null | undefined} sseBlocked
   * @returns {"sse" | "ws" | "poll"} */
  #firstMode(sseBlocked) {
    const wanted = this.#transportOption;
    if (wanted !== "auto") return wanted;
    // `sseBlocked` is only saved after WebSockets failed too (or by a client from
    // before WebSockets came first): long-polling at once.
    if (sseBlocked) return "poll";
    if (!this.#wsBlocked && typeof WebSocket === "function") return "ws";
    return canStreamFetch() ? "sse" : "poll";
  }

  #start() {
    if (this.#running || this.#closed) return;
    this.#running = true;
    this.#generation += 1;
    this.#failures = 0;
    this.#tokenRefreshes = 0;
    if (typeof globalThis.addEventListener === "function") {
      globalThis.addEventListener("online", this.#onOnline);
    }
    this.#run().catch((error) => {
      this.#stop(doloresError("internal", `the Dolores client failed: ${error && error.message}`, { cause: error }));
    });
  }

  #stopRunning() {
    this.#running = false;
    if (this.#controller) this.#controller.abort();
    if (this.#wake) this.#wake();
    if (typeof globalThis.removeEventListener === "function") {
      globalThis.removeEventListener("online", this.#onOnline);
    }
  }

  /** Stops for a reason the client cannot fix by itself: says why, and stays closed
   * until the app calls connect() again.
   * @param {DoloresError} error */
  #stop(error) {
    this.#stopRunning();
    this.#setStatus("closed");
    error.fatal = true;
    this.#emit("error", error);
  }

  async #run() {
    // A loop belongs to one start(): after a stop and a new start, an old loop still
    // waiting somewhere must not carry on beside the new one.
    const generation = this.#generation;
    const live = () => this.#running && this.#generation === generation;
    let primed = false;
    while (live()) {
      this.#setStatus("connecting");
      let token = null;
      try {
        token = await this.#getToken();
      } catch (error) {
        if (!live()) return;
        if (error && error.fatal) return this.#stop(error);
        this.#emit("error", doloresError("token_failed", `token(uid) failed: ${error && error.message}`, { cause: error, fatal: false }));
        await this.#sleep(this.#backoff());
        continue;
      }
      if (!live()) return;
      const controller = new AbortController();
      this.#controller = controller;
      /** @type {Outcome} */
      let outcome;
      const priming = this.#lastId == null && this.#mode !== "poll" && !primed;
      try {
        if (priming) {
          // A listener without a cursor of its own would resume from the server's
          // cursor — which counts what the server wrote, not what reached this page
          // (a stream held by a proxy, or cut before its first bytes, loses those).
          // One immediate poll takes the queue so far and the cursor; every stream
          // after it names the cursor.
          outcome = await this.#runPoll(controller, token, { once: true });
        } else if (this.#mode === "ws") outcome = await this.#runWs(controller, token);
        else if (this.#mode === "poll") outcome = await this.#runPoll(controller, token);
        else outcome = await this.#runSse(controller, token);
      } catch (error) {
        outcome = { kind: "retry", network: true, cause: error };
      } finally {
        controller.abort();
        if (this.#controller === controller) this.#controller = null;
      }
      if (!live()) return;
      if (outcome.kind === "fatal") return this.#stop(outcome.error);
      this.#setStatus("connecting");
      if (this.#transportOption === "auto" && !priming && this.#autoStep(outcome)) continue;
      if (outcome.kind !== "token_expired" && outcome.kind !== "token_revoked") this.#tokenRefreshes = 0;
      switch (outcome.kind) {
        case "token_expired":
        case "token_revoked": {
          const code = outcome.kind;
          const what = code === "token_revoked" ? "revoked (the app disconnected this listener)" : "expired";
          this.#token = null;
          if (typeof this.#tokenOption !== "function") {
            return this.#stop(doloresError(code, `the listener token was ${what} and there is no token(uid) function to get another`, { status: 401 }));
          }
          if (++this.#tokenRefreshes > MAX_TOKEN_REFRESHES) {
            return this.#stop(doloresError(code, `token(uid) keeps giving ${code === "token_revoked" ? "revoked" : "expired"} tokens`, { status: 401 }));
          }
          // After a revocation every try waits: the app may hand out a token of the same
          // second as the disconnect (refused too), and a page must not hammer it.
          if (code === "token_revoked" || this.#tokenRefreshes > 1) await this.#sleep(this.#backoff());
          continue;
        }
        case "primed":
          primed = true;
          continue;
        case "fallback":
          this.#mode = "poll";
          this.#sseTrial = false;
          this.#save(true);
          continue;
        case "bad_cursor":
          // The server cannot read our saved id (another server, another format):
          // start from its cursor, and tell the app it may have missed something.
          this.#lastId = null;
          this.#save();
          this.#emit("reset");
          continue;
        case "ended":
          // The server ended the stream on purpose (shutdown, restart): come back after
          // its retry time, spread out so a restart is not met by every client at once.
          if (outcome.opened) this.#failures = 0;
          await this.#sleep(Math.round(this.#retryMs * (0.5 + Math.random())));
          continue;
        default:
          if (outcome.opened) this.#failures = 0;
          if (outcome.network && !outcome.opened && this.#failures + 1 === UNREACHABLE_AFTER) {
            this.#emit("error", doloresError("unreachable", `cannot reach ${this.#server} (down, offline, or this page's origin is not in its cors_origins); still trying`, { fatal: false }));
          }
          await this.#sleep(this.#backoff());
      }
    }
  }

  /**
   * "auto" moves down WebSocket → SSE → long-polling. A WebSocket that never opens, twice
   * in a row, looks the same to a page whether a proxy refused the upgrade or the server
   * is down; so SSE is tried, and only when SSE opens are WebSockets taken as blocked
   * (and that kept for the session). When SSE cannot reach the server either, the server
   * was the problem: back to WebSockets. SSE held back by a proxy moves on to
   * long-polling (the "fallback" outcome). True when the loop should go on at once.
   * @param {Outcome} outcome
   * @returns {boolean}
   */
  #autoStep(outcome) {
    if (this.#mode === "ws") {
      // Anything else a WebSocket brought back came from the server: it got through.
      if (!outcome.wsMiss) {
        this.#wsMisses = 0;
        return false;
      }
      this.#wsMisses += 1;
      if (this.#wsMisses < WS_MISSES_BEFORE_SSE) return false;
      this.#wsMisses = 0;
      this.#mode = "sse";
      this.#sseTrial = true;
      return true;
    }
    if (this.#mode === "sse" && this.#sseTrial && outcome.kind === "retry" && !outcome.opened) {
      this.#sseTrial = false;
      this.#mode = "ws";
    }
    return false;
  }

  /** "auto": the SSE tried after WebSockets failed has opened, so WebSockets are what
   * cannot get through. */
  #sseOpened() {
    if (!this.#sseTrial) return;
    this.#sseTrial = false;
    this.#wsBlocked = true;
  }

  #backoff() {
    const delay = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** Math.min(this.#failures, 16));
    this.#failures += 1;
    return jitter(delay);
  }

  /** Waits `ms`, or less when the browser comes back online or the client stops.
   * @param {number} ms
   * @returns {Promise<void>} */
  #sleep(ms) {
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this.#wake = null;
        resolve();
      };
      const timer = setTimeout(done, ms);
      this.#wake = done;
    });
  }

  /** @returns {Promise<string | null>} */
  async #getToken() {
    const option = this.#tokenOption;
    if (!option) return null;
    if (typeof option === "string") return option;
    if (this.#token) return this.#token;
    const token = await option(this.#uid);
    if (typeof token !== "string" || !token) {
      throw new TypeError("token(uid) must return (or resolve to) a non-empty string");
    }
    this.#token = token;
    return token;
  }

  /** A connection attempt got through: the backoff starts over. */
  #opened() {
    this.#failures = 0;
    this.#tokenRefreshes = 0;
    this.#setStatus("open");
  }

  /** @param {string} path
   * @param {string | null} token
   * @param {Record<string, string | number>} [extra] */
  #url(path, token, extra = {}) {
    const params = new URLSearchParams();
    if (token) params.set("token", token);
    if (this.#lastId != null) params.set("last_event_id", this.#lastId);
    for (const [key, value] of Object.entries(extra)) params.set(key, String(value));
    const query = params.toString();
    return `${this.#server}${path}${encodeURIComponent(this.#uid)}${query ? `?${query}` : ""}`;
  }

  /** What an HTTP error answer from a listener endpoint means for the loop.
   * @param {Response} response
   * @param {{sseAuto?: boolean}} [options]
   * @returns {Promise<Outcome>} */
  async #httpOutcome(response, { sseAuto = false } = {}) {
    const status = response.status;
    const error = await errorCode(response);
    const code = error ? error.code : `http_${status}`;
    const message = error ? error.message : `${response.url} answered ${status}`;
    if (status === 401 && code === "token_expired") return { kind: "token_expired" };
    if (status === 401 && code === "token_revoked") return { kind: "token_revoked" };
    if (status === 400 && code === "bad_event_id") return { kind: "bad_cursor" };
    if (status === 429 || status >= 500) return { kind: "retry" };
    // Something that is not Dolores answered the SSE request (a proxy, a filter): try
    // long-polling, which such things let through more often.
    if (sseAuto && !error) return { kind: "fallback" };
    return { kind: "fatal", error: doloresError(code, message, { status }) };
  }

  // ---- transports ------------------------------------------------------------------

  /** Server-Sent Events over fetch(): resolves with the outcome when the stream ends.
   * @param {AbortController} controller
   * @param {string | null} token
   * @returns {Promise<Outcome>} */
  async #runSse(controller, token) {
    const auto = this.#transportOption === "auto";
    /** @type {() => Outcome} */
    const blocked = () => (auto ? { kind: "fallback" } : { kind: "retry" });
    let stage = "headers";
    let timedOut = false;
    const expire = () => {
      timedOut = true;
      controller.abort();
    };
    let timer = setTimeout(expire, SSE_HEADERS_TIMEOUT_MS);
    /** @param {number} ms */
    const arm = (ms) => {
      clearTimeout(timer);
      timer = setTimeout(expire, ms);
    };
    try {
      let response;
      try {
        response = await fetch(this.#url("/listen/", token), {
          signal: controller.signal,
          cache: "no-store",
          headers: { Accept: "text/event-stream" },
        });
      } catch (error) {
        if (timedOut && this.#running) return blocked();
        return { kind: "retry", network: true, cause: error };
      }
      if (!response.ok) return await this.#httpOutcome(response, { sseAuto: auto });
      const type = (response.headers.get("content-type") || "").toLowerCase();
      if (!type.startsWith("text/event-stream") || !response.body || !response.body.getReader) {
        return blocked();
      }
      stage = "first bytes";
      arm(SSE_FIRST_BYTES_TIMEOUT_MS);
      const reader = response.body.getReader();
      const parser = new SseParser({
        event: (type, data, id) => this.#sseEvent(type, data, id),
        retry: (ms) => { this.#retryMs = ms; },
      });
      const decoder = new TextDecoder();
      for (;;) {
        let chunk;
        try {
          chunk = await reader.read();
        } catch (error) {
          if (!this.#running) return { kind: "aborted" };
          if (stage === "first bytes") return timedOut ? blocked() : { kind: "retry", network: true };
          return { kind: "retry", opened: true, network: !timedOut };
        }
        if (chunk.done) {
          return stage === "first bytes" ? { kind: "retry" } : { kind: "ended", opened: true };
        }
        if (stage === "first bytes") {
          stage = "open";
          this.#sseOpened();
          this.#opened();
        }
        arm(SSE_IDLE_TIMEOUT_MS);
        parser.push(decoder.decode(chunk.value, { stream: true }), () => controller.signal.aborted);
        this.#save();
        if (controller.signal.aborted) return { kind: "aborted" };
      }
    } finally {
      clearTimeout(timer);
    }
  }

  /** @param {string} type
   * @param {string} data
   * @param {string | null} id */
  #sseEvent(type, data, id) {
    let body;
    try {
      body = JSON.parse(data);
    } catch {
      return;
    }
    if (type === "reset") this.#reset(id);
    else if (type === "message" && body && typeof body === "object") this.#deliver(id, body.track, body.message);
  }

  /** Long-polling: one request after another, each naming the last id received.
   * @param {AbortController} controller
   * @param {string | null} token
   * @param {{once?: boolean}} [options] `once`: one immediate request (priming), then "primed"
   * @returns {Promise<Outcome>} */
  async #runPoll(controller, token, { once = false } = {}) {
    let first = true;
    while (!controller.signal.aborted) {
      // The first request of a connection asks for an answer at once, so the status
      // says "open" as soon as the server has been reached.
      const timeout = first ? 0 : POLL_TIMEOUT_S;
      const started = Date.now();
      let timedOut = false;
      const timer = setTimeout(() => {
        timedOut = true;
        controller.abort();
      }, timeout * 1000 + POLL_GRACE_MS);
      let response;
      let body;
      try {
        response = await fetch(this.#url("/poll/", token, { timeout }), {
          signal: controller.signal,
          cache: "no-store",
        });
        if (response.ok) body = await response.json();
      } catch (error) {
        if (!this.#running) return { kind: "aborted" };
        return { kind: "retry", opened: !first, network: !timedOut, cause: error };
      } finally {
        clearTimeout(timer);
      }
      if (!response.ok) return await this.#httpOutcome(response);
      if (!body || !Array.isArray(body.events)) return { kind: "retry", opened: !first };
      if (first) {
        first = false;
        if (!once) this.#opened();
      }
      if (body.reset) {
        this.#reset(body.last_event_id);
      } else {
        for (const event of body.events) {
          if (controller.signal.aborted) return { kind: "aborted" };
          this.#deliver(event.id, event.track, event.message);
        }
        if (controller.signal.aborted) return { kind: "aborted" };
        if (typeof body.last_event_id === "string" && !notAfter(body.last_event_id, this.#lastId)) {
          this.#lastId = body.last_event_id;
        }
      }
      this.#save();
      if (once) return { kind: "primed" };
      if (timeout > 0 && body.events.length === 0 && !body.reset) {
        const left = POLL_MIN_INTERVAL_MS - (Date.now() - started);
        if (left > 0) await this.#sleep(left);
      }
    }
    return { kind: "aborted" };
  }

  /** WebSocket: resolves with the outcome when the socket closes.
   * @param {AbortController} controller
   * @param {string | null} token
   * @returns {Promise<Outcome>} */
  #runWs(controller, token) {
    if (typeof WebSocket !== "function") {
      return Promise.resolve({ kind: "fatal", error: doloresError("no_websocket", "this browser has no WebSocket") });
    }
    return new Promise((resolve) => {
      const url = this.#url("/ws/", token).replace(/^http/, "ws");
      let socket;
      try {
        socket = new WebSocket(url);
      } catch (error) {
        resolve({ kind: "fatal", error: doloresError("bad_server", `cannot open ${url}: ${error.message}`) });
        return;
      }
      let opened = false;
      /** @type {ReturnType<typeof setTimeout> | undefined} */
      let grace;
      const markOpen = () => {
        if (opened) return;
        opened = true;
        clearTimeout(grace);
        this.#opened();
      };
      /** @param {Outcome} outcome */
      const finish = (outcome) => {
        clearTimeout(grace);
        socket.onopen = socket.onmessage = socket.onclose = socket.onerror = null;
        controller.signal.removeEventListener("abort", onAbort);
        if (socket.readyState === WebSocket.CONNECTING || socket.readyState === WebSocket.OPEN) {
          try { socket.close(1000); } catch { /* already closing */ }
        }
        resolve(outcome);
      };
      const onAbort = () => finish({ kind: "aborted" });
      controller.signal.addEventListener("abort", onAbort);
      socket.onopen = () => {
        grace = setTimeout(markOpen, WS_OPEN_GRACE_MS);
      };
      socket.onmessage = (event) => {
        if (typeof event.data !== "string") return;
        let frame;
        try {
          frame = JSON.parse(event.data);
        } catch {
          return;
        }
        if (!frame || typeof frame !== "object") return;
        markOpen();
        if (frame.reset) this.#reset(frame.id);
        else if (frame.track !== undefined) this.#deliver(frame.id, frame.track, frame.message);
        this.#save();
      };
      socket.onclose = (event) => finish(wsOutcome(event.code, event.reason, opened));
    });
  }

  // ---- delivery --------------------------------------------------------------------

  /** @param {string | number | null | undefined} id
   * @param {unknown} track
   * @param {Json} message */
  #deliver(id, track, message) {
    if (id != null) {
      id = String(id);
      if (notAfter(id, this.#lastId)) return;
      this.#lastId = id;
    }
    if (typeof track !== "string" || this.#dropped.has(track)) return;
    const callbacks = this.#callbacks.get(track);
    if (!callbacks || !callbacks.size) {
      this.#hold(track, message);
      return;
    }
    for (const callback of [...callbacks]) {
      try {
        callback(track, message);
      } catch (error) {
        report(error);
      }
    }
  }

  /** @param {string | number | null | undefined} id */
  #reset(id) {
    if (id != null) this.#lastId = String(id);
    this.#save();
    this.#emit("reset");
  }

  /** @param {string} track
   * @param {Json} message */
  #hold(track, message) {
    if (this.#heldCount >= MAX_HELD_MESSAGES) return;
    let held = this.#held.get(track);
    if (!held) this.#held.set(track, (held = []));
    held.push(message);
    this.#heldCount += 1;
  }

  /** @param {string} track */
  #dropHeld(track) {
    const held = this.#held.get(track);
    if (held) this.#heldCount -= held.length;
    this.#held.delete(track);
  }

  /** @param {string} track */
  #releaseHeld(track) {
    const held = this.#held.get(track);
    const callbacks = this.#callbacks.get(track);
    if (!held || !callbacks || !callbacks.size) return;
    this.#dropHeld(track);
    for (const message of held) {
      for (const callback of [...callbacks]) {
        try {
          callback(track, message);
        } catch (error) {
          report(error);
        }
      }
    }
  }

  // ---- the app's views, storage, events ---------------------------------------------

  /** @param {string} base
   * @param {string} track
   * @returns {Promise<void>} */
  async #post(base, track) {
    const url = new URL(base + trackPath(track), globalThis.location ? globalThis.location.href : this.#server);
    const sameOrigin = !globalThis.location || url.origin === globalThis.location.origin;
    /** @type {Record<string, string>} */
    const headers = { "Content-Type": "application/json", Accept: "application/json" };
    const csrf = readCookie("csrftoken");
    if (csrf) headers["X-CSRFToken"] = csrf;
    let response;
    try {
      response = await fetch(url.href, {
        method: "POST",
        headers,
        body: JSON.stringify({ uid: this.#uid }),
        credentials: sameOrigin ? "same-origin" : "include",
      });
    } catch (error) {
      throw doloresError("network", `POST ${url.href} failed: ${error.message}`, { cause: error });
    }
    if (!response.ok) {
      const error = await errorCode(response);
      throw doloresError(error ? error.code : `http_${response.status}`,
        error ? error.message : `POST ${url.href} answered ${response.status}`, { status: response.status });
    }
  }

  /** @param {boolean} [sseBlocked] */
  #save(sseBlocked) {
    if (!this.#store) return;
    try {
      /** @type {Saved} */
      const entry = { uid: this.#uid, last: this.#lastId };
      if (this.#wsBlocked) entry.wsBlocked = true;
      if (sseBlocked || this.#mode === "poll" && this.#transportOption === "auto") entry.sseBlocked = true;
      this.#store.setItem(this.#storeKey, JSON.stringify(entry));
    } catch {
      // Full or gone: a reload then starts from the server's cursor instead.
    }
  }

  /** @param {Status} status */
  #setStatus(status) {
    if (!STATUSES.has(status) || status === this.#status) return;
    this.#status = status;
    this.#emit("status", status);
  }

  /** @param {EventName} event
   * @param {unknown} [value] */
  #emit(event, value) {
    for (const fn of [...this.#handlers[event]]) {
      try {
        if (value === undefined) fn();
        else fn(value);
      } catch (error) {
        report(error);
      }
    }
  }
}

function canStreamFetch() {
  return typeof fetch === "function" && typeof ReadableStream === "function"
    && typeof TextDecoder === "function" && typeof Response === "function" && "body" in Response.prototype;
}

/** What a WebSocket close code means for the loop. The server refuses with 44xx codes
 * whose reason is the error code, since a browser cannot see a failed handshake's status.
 * @param {number} code
 * @param {string} reason
 * @param {boolean} opened
 * @returns {Outcome} */
function wsOutcome(code, reason, opened) {
  switch (code) {
    case 4401:
      if (reason === "token_expired") return { kind: "token_expired" };
      if (reason === "token_revoked") return { kind: "token_revoked" };
      return { kind: "fatal", error: doloresError(reason || "unauthorized", `the server refused the listener: ${reason || code}`, { status: 401, closeCode: code }) };
    case 4404:
      return { kind: "fatal", error: doloresError(reason || "unknown_listener", "no such listener: the app must connect it to a track first", { status: 404, closeCode: code }) };
    case 4400:
      if (reason === "bad_event_id") return { kind: "bad_cursor" };
      return { kind: "fatal", error: doloresError(reason || "bad_request", `the server refused the request: ${reason || code}`, { status: 400, closeCode: code }) };
    case 1000:
    case 1001:
    case 4008:
      // Going away (shutdown) or too slow a reader: come back and resume.
      return { kind: "ended", opened: true };
    case 1009:
    case 1011:
      // The server's own words (a frame too big, a store failure): not a blocked socket.
      return { kind: "retry", opened, network: false };
    default:
      // Never opened: the handshake failed (1006), or whatever answered closed it at
      // once — a server that is down, or something between that does not let WebSockets
      // through ("auto" tells them apart by trying SSE).
      return { kind: "retry", opened, network: !opened, wsMiss: !opened };
  }
}

/** The Server-Sent Events format, as the HTML standard parses it. */
class SseParser {
  /** @type {{event: (type: string, data: string, id: string | null) => void, retry: (ms: number) => void}} */
  #sink;
  #buffer = "";
  /** @type {string[]} */
  #data = [];
  #type = "";
  /** @type {string | null} */
  #id = null;
  #start = true;

  /** @param {{event: (type: string, data: string, id: string | null) => void, retry: (ms: number) => void}} sink */
  constructor(sink) {
    this.#sink = sink;
  }

  /** Feeds decoded text; `stopped()` ends dispatching early (the client was closed).
   * @param {string} text
   * @param {() => boolean} stopped */
  push(text, stopped) {
    if (this.#start) {
      if (!text) return;
      this.#start = false;
      if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
    }
    this.#buffer += text;
    let from = 0;
    for (;;) {
      const cr = this.#buffer.indexOf("\r", from);
      const lf = this.#buffer.indexOf("\n", from);
      let end = cr < 0 ? lf : lf < 0 ? cr : Math.min(cr, lf);
      if (end < 0) break;
      let next = end + 1;
      if (this.#buffer[end] === "\r") {
        // A CR at the very end may be the first half of CRLF: wait for more.
        if (end === this.#buffer.length - 1) break;
        if (this.#buffer[end + 1] === "\n") next += 1;
      }
      this.#line(this.#buffer.slice(from, end));
      from = next;
      if (stopped()) break;
    }
    this.#buffer = this.#buffer.slice(from);
  }

  /** @param {string} line */
  #line(line) {
    if (line === "") {
      if (this.#data.length) {
        this.#sink.event(this.#type || "message", this.#data.join("\n"), this.#id);
      }
      this.#data = [];
      this.#type = "";
      // EventSource keeps the last id for events without one; a message without its
      // own id must not look like a repeat of the one before, so it gets none.
      this.#id = null;
      return;
    }
    if (line[0] === ":") return;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value[0] === " ") value = value.slice(1);
    if (field === "data") this.#data.push(value);
    else if (field === "event") this.#type = value;
    else if (field === "id" && !value.includes("\u0000")) this.#id = value;
    else if (field === "retry" && /^\d+$/.test(value)) this.#sink.retry(Number(value));
  }
}
