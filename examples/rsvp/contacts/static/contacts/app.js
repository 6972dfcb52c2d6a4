// The RSVP page: a data layer that keeps the contacts fresh (the app's API is the source
// of truth; Dolores only says *which* contact changed), and a table that shows them.

const csrfToken = () => {
  const match = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
  return match ? decodeURIComponent(match[1]) : "";
};

async function api(method, url, body) {
  const response = await fetch(url, {
    method,
    credentials: "same-origin",
    headers: body === undefined
      ? { "X-CSRFToken": csrfToken() }
      : { "Content-Type": "application/json", "X-CSRFToken": csrfToken() },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = response.status === 204 ? null : await response.json().catch(() => null);
  if (!response.ok) {
    const error = new Error((data && data.error && data.error.message) || `${method} ${url}: ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return data;
}

/** The contacts this page knows, kept fresh from the API. */
export class Contacts {
  #records = new Map();   // id -> contact
  #deleted = new Set();   // ids are never reused: a deleted one stays deleted
  #latest = new Map();    // id -> number of the latest refetch, so a stale answer loses
  #requests = 0;
  #watchers = new Set();

  all() {
    return [...this.#records.values()].sort((a, b) => a.id - b.id);
  }

  watch(fn) {
    this.#watchers.add(fn);
    return () => this.#watchers.delete(fn);
  }

  /** Loads every contact (at start, and after a reset). */
  async loadAll() {
    const before = new Set(this.#records.keys());
    const { contacts } = await api("GET", "/api/contacts");
    const listed = new Set(contacts.map((c) => c.id));
    for (const contact of contacts) this.put(contact);
    // Known before the list was taken and absent from it: deleted meanwhile.
    for (const id of before) if (!listed.has(id)) this.remove(id);
  }

  /** Fetches one contact again; gone (404) means deleted. */
  async refetch(id) {
    const ticket = ++this.#requests;
    this.#latest.set(id, ticket);
    let contact = null;
    try {
      contact = await api("GET", `/api/contacts/${id}`);
    } catch (error) {
      if (error.status !== 404) throw error;
    }
    if (this.#latest.get(id) !== ticket) return; // a later refetch of this id wins
    if (contact) this.put(contact);
    else this.remove(id);
  }

  /** What the track says: {"contact": id, "change": "created" | "updated" | "deleted"}. */
  changed({ contact, change }) {
    if (!Number.isInteger(contact)) return;
    if (change === "deleted") this.remove(contact);
    else this.#refresh(contact);
  }

  // A message that came while the app's API could not be reached (the network dropped
  // right after it) must not be lost: the refetch is tried again, sooner when the
  // browser says it is back online.
  #stale = new Map(); // id -> attempts so far
  #retryTimer = null;

  async #refresh(id) {
    try {
      await this.refetch(id);
      this.#stale.delete(id);
    } catch (error) {
      this.#stale.set(id, (this.#stale.get(id) || 0) + 1);
      this.#scheduleRetry();
    }
  }

  #scheduleRetry() {
    if (this.#retryTimer || this.#stale.size === 0) return;
    const attempts = Math.max(...this.#stale.values());
    this.#retryTimer = setTimeout(() => this.retryStale(), Math.min(30000, 500 * 2 ** Math.min(attempts, 6)));
  }

  /** Refetches what could not be fetched before (called again when back online). */
  retryStale() {
    clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
    for (const id of this.#stale.keys()) this.#refresh(id);
  }

  put(contact) {
    if (this.#deleted.has(contact.id)) return;
    const held = this.#records.get(contact.id);
    if (held && held.version > contact.version) return; // an older answer came late
    this.#records.set(contact.id, contact);
    this.#notify(contact.id);
  }

  remove(id) {
    this.#deleted.add(id);
    if (this.#records.delete(id)) this.#notify(id);
  }

  #notify(id) {
    for (const fn of this.#watchers) fn(id);
  }

  // Changes made on this page go through the API; the answer updates the page at once
  // (the other pages learn it from Dolores).
  async create(fields) {
    this.put(await api("POST", "/api/contacts", fields));
  }

  async update(id, fields) {
    this.put(await api("PATCH", `/api/contacts/${id}`, fields));
  }

  async delete(id) {
    await api("DELETE", `/api/contacts/${id}`);
    this.remove(id);
  }
}

/** "1 person here", "3 people here". */
export function hereText(n) {
  return `${n} ${n === 1 ? "person" : "people"} here`;
}

// ---- the table -------------------------------------------------------------------------

const ATTENDING = { yes: "Yes", maybe: "Maybe", no: "No" };

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text;
  return td;
}

function button(label, action) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.dataset.action = action;
  return b;
}

function showRow(tr, contact) {
  tr.replaceChildren(
    cell(contact.name),
    cell(contact.email),
    cell(ATTENDING[contact.attending] || contact.attending),
    cell(String(contact.guests)),
  );
  const actions = document.createElement("td");
  actions.className = "actions";
  actions.append(button("Edit", "edit"), " ", button("Remove", "remove"));
  tr.append(actions);
  tr.dataset.version = String(contact.version);
  delete tr.dataset.editing;
}

function editRow(tr, contact) {
  tr.dataset.editing = "1";
  const input = (name, value, attrs = {}) => {
    const td = document.createElement("td");
    const el = document.createElement("input");
    Object.assign(el, { name, value }, attrs);
    el.setAttribute("aria-label", name);
    td.append(el);
    return td;
  };
  const select = document.createElement("select");
  select.name = "attending";
  select.setAttribute("aria-label", "attending");
  for (const [value, label] of Object.entries(ATTENDING)) {
    select.append(new Option(label, value, false, value === contact.attending));
  }
  const selectCell = document.createElement("td");
  selectCell.append(select);
  const actions = document.createElement("td");
  actions.className = "actions";
  actions.append(button("Save", "save"), " ", button("Cancel", "cancel"));
  tr.replaceChildren(
    input("name", contact.name, { maxLength: 100, placeholder: "Name" }),
    input("email", contact.email, { type: "email", placeholder: "Email (optional)" }),
    selectCell,
    input("guests", String(contact.guests), { type: "number", min: 0, max: 20 }),
    actions,
  );
}

function fieldsOf(container) {
  const value = (name) => container.querySelector(`[name="${name}"]`).value;
  return { name: value("name"), email: value("email"), attending: value("attending"), guests: Number(value("guests") || 0) };
}

export async function start(Dolores, config) {
  const store = new Contacts();
  const tbody = document.querySelector("#contacts tbody");
  const empty = document.getElementById("empty");
  const summary = document.getElementById("summary");
  const errorBox = document.getElementById("error");
  const status = document.getElementById("status");
  const here = document.getElementById("here");

  const showError = (error) => {
    errorBox.textContent = error ? error.message || String(error) : "";
    errorBox.hidden = !error;
  };

  const render = (changedId) => {
    const contacts = store.all();
    const rows = new Map([...tbody.rows].map((tr) => [Number(tr.dataset.contactId), tr]));
    let previous = null;
    for (const contact of contacts) {
      let tr = rows.get(contact.id);
      rows.delete(contact.id);
      if (!tr) {
        tr = document.createElement("tr");
        tr.dataset.contactId = String(contact.id);
        showRow(tr, contact);
      } else if (!tr.dataset.editing && tr.dataset.version !== String(contact.version)) {
        showRow(tr, contact); // a row being edited here keeps what is being typed
      }
      if (contact.id === changedId) {
        tr.classList.remove("flash");
        void tr.offsetWidth;
        tr.classList.add("flash");
      }
      const next = previous ? previous.nextSibling : tbody.firstChild;
      if (next !== tr) tbody.insertBefore(tr, next);
      previous = tr;
    }
    for (const tr of rows.values()) tr.remove();
    empty.hidden = contacts.length > 0;
    const coming = contacts.filter((c) => c.attending === "yes");
    const people = coming.reduce((n, c) => n + 1 + c.guests, 0);
    summary.textContent = contacts.length
      ? `${coming.length} coming, ${people} ${people === 1 ? "person" : "people"} in all`
      : "";
  };
  store.watch(render);

  document.getElementById("add").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = event.currentTarget;
    try {
      await store.create(fieldsOf(form));
      form.reset();
      showError(null);
    } catch (error) {
      showError(error);
    }
  });

  tbody.addEventListener("click", async (event) => {
    const action = event.target.dataset && event.target.dataset.action;
    if (!action) return;
    const tr = event.target.closest("tr");
    const id = Number(tr.dataset.contactId);
    const contact = store.all().find((c) => c.id === id);
    try {
      if (action === "edit" && contact) editRow(tr, contact);
      else if (action === "cancel" && contact) showRow(tr, contact);
      else if (action === "save") {
        await store.update(id, fieldsOf(tr)); // on an error the row stays in edit mode
        const saved = store.all().find((c) => c.id === id);
        if (saved) showRow(tr, saved);
      } else if (action === "remove") await store.delete(id);
      showError(null);
    } catch (error) {
      showError(error);
    }
  });

  // Live: subscribe this page (through the app's /:connect/ view), then load the list,
  // so nothing that changes in between is missed.
  const dolores = new Dolores({ server: config.doloresUrl, connectUrl: "/:connect/", disconnectUrl: "/:disconnect/" });
  const labels = { connecting: "connecting…", open: "live", closed: "offline" };
  dolores.on("status", (s) => {
    status.dataset.status = s;
    status.textContent = labels[s] || s;
  });
  // Something was too old to replay (a very long absence): reload everything.
  dolores.on("reset", () => store.loadAll().catch(showError));
  dolores.on("error", (error) => console.warn("dolores:", error.code, error.message));
  globalThis.addEventListener("online", () => store.retryStale());
  window.rsvp = { store, dolores };
  try {
    // The track carries the contacts' changes, and {"here": n}: how many people are
    // viewing the list (the app publishes it when Dolores' webhooks say one came or went).
    await dolores.connect(config.track, (track, message) => {
      if (message && Number.isInteger(message.here)) {
        here.textContent = hereText(message.here);
        here.hidden = false;
      } else store.changed(message);
    });
  } catch (error) {
    showError(error);
  }
  await store.loadAll().catch(showError);
  render(null);
}
