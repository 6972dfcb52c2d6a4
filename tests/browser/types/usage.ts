// Every export and member of clients/js/dolores.d.ts, used as an app would; compiled by
// tsc (tsconfig.usage.json), never run. A .d.ts that loses, renames or loosens one fails
// here; test/types.test.js also holds the .d.ts against dolores.js itself.
import { Dolores } from "../../../clients/js/dolores.js";
import type { DoloresError, DoloresOptions, Json, MessageCallback, Status, Transport } from "../../../clients/js/dolores.js";

const transports: Transport[] = ["auto", "sse", "ws", "poll"];
const options: DoloresOptions = {
  server: "http://127.0.0.1:8007",
  connectUrl: "/:connect/",
  disconnectUrl: "/:disconnect/",
  token: async (uid: string) => `token-for-${uid}`,
  transport: transports[0],
};
const withFixedToken: DoloresOptions = { token: "header.payload.signature", transport: "poll" };
const withSyncToken: DoloresOptions = { token: (uid) => uid.toUpperCase() };

const dolores = new Dolores(options);
new Dolores(withFixedToken);
new Dolores(withSyncToken);
new Dolores();

const uid: string = dolores.uid;
// @ts-expect-error uid is read-only
dolores.uid = uid;

const received: Json[] = [];
const onMessage: MessageCallback = (track: string, message: Json) => {
  received.push({ track, message });
};
const json: Json = { list: [1, "two", null, true, { nested: [] }] };
received.push(json);

async function app(): Promise<void> {
  const connected: Promise<void> = dolores.connect(":data", onMessage);
  await connected;
  await dolores.connect("rooms/42", (track, message) => {
    const t: string = track;
    const m: Json = message;
    received.push([t, m]);
  });
  const disconnected: Promise<void> = dolores.disconnect("rooms/42");
  await disconnected;

  const offReset: () => void = dolores.on("reset", () => {
    received.length = 0;
  });
  const offStatus: () => void = dolores.on("status", (status) => {
    const s: "connecting" | "open" | "closed" = status;
    const back: Status = s;
    received.push(back);
  });
  const offError: () => void = dolores.on("error", (error) => {
    const e: Error = error;
    const name: "DoloresError" = error.name;
    const code: string = error.code;
    const status: number | undefined = error.status;
    const closeCode: number | undefined = error.closeCode;
    const fatal: boolean | undefined = error.fatal;
    const all: DoloresError = error;
    received.push([e.message, name, code, status ?? null, closeCode ?? null, fatal ?? null, all.code]);
  });
  offReset();
  offStatus();
  offError();

  // @ts-expect-error only "reset", "status" and "error"
  dolores.on("message", () => {});
  // @ts-expect-error a status listener gets a Status
  dolores.on("status", (status: number) => status);
  // @ts-expect-error no such transport
  new Dolores({ transport: "websocket" });
  // @ts-expect-error a track is a string
  await dolores.connect(42, onMessage);
  // @ts-expect-error a message callback takes (track, message)
  await dolores.connect(":data", (track: string, message: Json, extra: number) => extra);

  dolores.close();
}

export { app };
