// Types of the Dolores browser client (dolores.js). Hand-written; keep in step with it.

/** Any JSON value: what the app's backend published with `update(track, message)`. */
export type Json = string | number | boolean | null | Json[] | { [key: string]: Json };

/** "connecting" while (re)connecting or backing off, "open" while the stream gets
 * through, "closed" after close() or after an error the client cannot fix by itself. */
export type Status = "connecting" | "open" | "closed";

/** How the client reaches the server. "auto" (the default) opens a WebSocket (browsers do
 * not count WebSockets against the six HTTP/1.1 connections per host that all tabs share,
 * so any number of tabs work), falls back to Server-Sent Events where WebSockets cannot get
 * through, and to long-polling where SSE is held back; a fallback is kept for the tab's
 * session. "ws" is WebSocket only, "sse" Server-Sent Events, "poll" long-polling. */
export type Transport = "auto" | "sse" | "ws" | "poll";

export interface DoloresOptions {
  /** Where Dolores listens, e.g. "http://127.0.0.1:8007" or, behind a proxy,
   * "https://app.example/dolores" (a path prefix is kept). Defaults to the folder this
   * module was loaded from, which is right when it is imported from the server's own
   * /dolores.js (or /dolores/dolores.js under a base path). */
  server?: string;
  /** The app's connect view: connect(track) POSTs {"uid"} to connectUrl + track, with the
   * page's credentials and X-CSRFToken from the csrftoken cookie. Leave it out when the
   * listener token's `tracks` claim grants the tracks. */
  connectUrl?: string;
  /** The app's disconnect view, called by disconnect(track) the same way. */
  disconnectUrl?: string;
  /** The listener token, where the server has a token secret: a function the client calls
   * with its uid for a fresh token (again whenever the server says the token expired or
   * was revoked — the app disconnected the listener), or a fixed token. */
  token?: string | ((uid: string) => string | Promise<string>);
  /** Default "auto". */
  transport?: Transport;
}

/** What the client reports through on("error") and what connect()/disconnect() reject with. */
export interface DoloresError extends Error {
  name: "DoloresError";
  /** The server's or the app's error code, e.g. "unknown_listener", "bad_token",
   * "token_wrong_listener", "token_required", "token_revoked" (token(uid) kept giving
   * revoked tokens, or there is none), "csrf_failed"; or the client's own:
   * "unreachable" (not fatal: still trying), "token_failed" (token() threw; still
   * trying), "network" (a connect/disconnect POST failed), "http_<status>". */
  code: string;
  /** The HTTP status, where there was one (4401 → 401 for a WebSocket close). */
  status?: number;
  /** The WebSocket close code, when that is how the server said it. */
  closeCode?: number;
  /** True when the client stopped because of it (status "closed"): an app must act —
   * usually connect the listener, or get the user a valid session. */
  fatal?: boolean;
}

export type MessageCallback = (track: string, message: Json) => void;

export declare class Dolores {
  constructor(options?: DoloresOptions);

  /** The listener's uid: random (192 bits), kept in sessionStorage with the last event id,
   * so a reload of the page resumes the same queue. */
  readonly uid: string;

  /** Subscribes the listener to `track` (through connectUrl, when given), and calls
   * `callback(track, message)` for each of the track's messages, in publish order. The
   * first call opens the stream. Rejects when the app's view refuses. */
  connect(track: string, callback: MessageCallback): Promise<void>;

  /** Stops the callbacks of `track` and unsubscribes it (through disconnectUrl, when given). */
  disconnect(track: string): Promise<void>;

  /** Something was too old to replay (or the server's store was wiped): reload your state
   * from the app; only messages after this point follow. */
  on(event: "reset", listener: () => void): () => void;
  on(event: "status", listener: (status: Status) => void): () => void;
  on(event: "error", listener: (error: DoloresError) => void): () => void;

  /** Closes the stream for good. The listener and its queue stay on the server. */
  close(): void;
}
