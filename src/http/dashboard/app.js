// Baton dashboard: one page over the /v1 API, no framework, no build step.
//
// Every piece of data reaches the DOM as text (`h` appends strings as text
// nodes; nothing here assigns innerHTML), so nothing needs escaping. Views
// are functions `(ctx) -> {title, refresh}`; the poller calls the current
// view's `refresh` every 2 s while the tab is visible.

const POLL_MS = 2000;
const PAGE = 50;
const STATUSES = ["Queued", "Running", "Completed", "Failed", "Cancelled", "Skipped"];
const ENDED = new Set(["Completed", "Failed", "Cancelled", "Skipped"]);
const RANGES = [
  ["", "Any time"],
  ["15m", "Last 15 minutes"],
  ["1h", "Last hour"],
  ["24h", "Last 24 hours"],
  ["7d", "Last 7 days"],
  ["custom", "Custom range…"],
];
const RANGE_MS = { "15m": 15 * 60e3, "1h": 3600e3, "24h": 24 * 3600e3, "7d": 7 * 24 * 3600e3 };
const MAX_JSON_CHARS = 200_000;
const HIGHLIGHT_CHARS = 60_000;

// ---------------------------------------------------------------- DOM helpers

/** Creates an element. Strings among `children` become text nodes. */
function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props ?? {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") el.className = value;
    // Through the CSSOM: the CSP refuses inline style attributes.
    else if (key === "style" && typeof value === "object") Object.assign(el.style, value);
    else if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2), value);
    } else if (key === "value" || key === "checked" || key === "selected") el[key] = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

/** Makes `parent`'s children exactly `nodes`, moving only what changed, so
 *  unchanged rows keep their focus, selection and open details. */
function reconcile(parent, nodes) {
  nodes.forEach((node, i) => {
    const current = parent.childNodes[i];
    if (current !== node) parent.insertBefore(node, current ?? null);
  });
  while (parent.childNodes.length > nodes.length) parent.lastChild.remove();
}

/** The cached node for `key` while its `signature` is unchanged. */
function keyed(cache, key, signature, build) {
  const hit = cache.get(key);
  if (hit && hit.signature === signature) return hit.node;
  const node = build();
  cache.set(key, { signature, node });
  return node;
}

/** Forgets cached nodes whose keys are no longer shown. */
function prune(cache, keys) {
  const keep = new Set(keys);
  for (const key of cache.keys()) if (!keep.has(key)) cache.delete(key);
}

/** Open/closed state of collapsibles, kept across re-renders. */
const openState = new Map();

function collapsible(key, summary, body, open = false) {
  const details = h("details", { class: "collapsible" }, h("summary", null, summary), body);
  details.open = openState.has(key) ? openState.get(key) : open;
  details.addEventListener("toggle", () => openState.set(key, details.open));
  return details;
}

const enc = encodeURIComponent;
const isObject = (value) => value !== null && typeof value === "object" && !Array.isArray(value);
const runHref = (id) => `#/runs/${enc(id)}`;

/** Only http(s) links: app URLs come from the apps themselves. */
function safeUrl(url) {
  return typeof url === "string" && /^https?:\/\//i.test(url) ? url : null;
}

// ---------------------------------------------------------------- formatting

function parseTime(iso) {
  if (!iso) return null;
  const t = Date.parse(iso);
  return Number.isFinite(t) ? t : null;
}

function fmtDuration(ms) {
  if (ms === null || !Number.isFinite(ms)) return "";
  ms = Math.max(0, ms);
  if (ms < 1000) return `${Math.round(ms)}ms`;
  if (ms < 10_000) return `${(ms / 1000).toFixed(1)}s`;
  const s = Math.round(ms / 1000);
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return s % 60 ? `${m}m ${s % 60}s` : `${m}m`;
  const hours = Math.floor(m / 60);
  if (hours < 48) return m % 60 ? `${hours}h ${m % 60}m` : `${hours}h`;
  const days = Math.floor(hours / 24);
  return hours % 24 ? `${days}d ${hours % 24}h` : `${days}d`;
}

/** "12s", "3m", "5h", "2d": the largest unit only. */
function fmtCoarse(ms) {
  const s = Math.round(Math.abs(ms) / 1000);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m`;
  if (s < 48 * 3600) return `${Math.floor(s / 3600)}h`;
  return `${Math.floor(s / 86400)}d`;
}

function fmtRelative(t) {
  const diff = Date.now() - t;
  if (Math.abs(diff) < 3000) return "just now";
  return diff > 0 ? `${fmtCoarse(diff)} ago` : `in ${fmtCoarse(diff)}`;
}

function fmtClock(t) {
  const date = new Date(t);
  const time = date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23" });
  const now = new Date();
  if (date.toDateString() === now.toDateString()) return time;
  const year = date.getFullYear() === now.getFullYear() ? undefined : "numeric";
  return `${date.toLocaleDateString([], { year, month: "short", day: "numeric" })} ${time}`;
}

function fmtBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;

/** A <time>: relative ("3m ago", kept fresh by the ticker) or a clock time. */
function timeEl(iso, relative = true) {
  const t = parseTime(iso);
  if (t === null) return h("span", { class: "muted" }, "—");
  const el = h(
    "time",
    { datetime: new Date(t).toISOString(), title: new Date(t).toLocaleString() },
    relative ? fmtRelative(t) : fmtClock(t),
  );
  if (relative) el.dataset.ago = String(t);
  return el;
}

/** Time elapsed since `t`, kept fresh by the ticker. */
function elapsedEl(t) {
  return h("span", { class: "elapsed", "data-since": String(t) }, fmtDuration(Date.now() - t));
}

function tickTimes() {
  for (const el of document.querySelectorAll("[data-ago]")) {
    el.textContent = fmtRelative(Number(el.dataset.ago));
  }
  for (const el of document.querySelectorAll("[data-since]")) {
    el.textContent = fmtDuration(Date.now() - Number(el.dataset.since));
  }
}

// ---------------------------------------------------------------- JSON and values

/** Pretty JSON with token colours, all as text nodes. */
function jsonView(value) {
  const text = JSON.stringify(value, null, 2) ?? "undefined";
  const pre = h("pre", { class: "json" });
  const shown = text.length > MAX_JSON_CHARS ? text.slice(0, MAX_JSON_CHARS) : text;
  if (shown.length <= HIGHLIGHT_CHARS) highlightJson(pre, shown);
  else pre.textContent = shown;
  if (shown === text) return pre;
  const rest = fmtBytes(text.length - shown.length);
  const more = h("button", { type: "button", class: "btn small", onclick: () => {
    pre.textContent = text;
    more.remove();
  } }, `Show all (${rest} more)`);
  return h("div", null, pre, more);
}

const JSON_TOKEN = /("(?:\\.|[^"\\])*")(\s*:)?|\b(?:true|false|null)\b|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?/g;

function highlightJson(pre, text) {
  let last = 0;
  for (const match of text.matchAll(JSON_TOKEN)) {
    const [token, string, colon] = match;
    if (match.index > last) pre.append(text.slice(last, match.index));
    let kind = "num";
    if (string) kind = colon ? "key" : "str";
    else if (token === "null") kind = "null";
    else if (token === "true" || token === "false") kind = "bool";
    pre.append(h("span", { class: `j-${kind}` }, string ?? token));
    if (colon) pre.append(colon);
    last = match.index + token.length;
  }
  if (last < text.length) pre.append(text.slice(last));
}

/** A value: short ones inline, longer ones in a collapsible pretty block. */
function valueView(value, key, label = "Output", open = false) {
  const text = JSON.stringify(value);
  if (text === undefined) return null;
  if (text.length <= 90) return h("code", { class: "inline-json" }, text);
  return collapsible(key, `${label} · ${fmtBytes(text.length)}`, jsonView(value), open);
}

function errorView(error, key) {
  const err = isObject(error) ? error : { message: typeof error === "string" ? error : JSON.stringify(error) };
  const message = err.message ?? (isObject(error) ? JSON.stringify(error) : "");
  const box = h("div", { class: "error-box" }, h("strong", null, err.name || "Error"), message ? `: ${message}` : "");
  if (err.stack) box.append(collapsible(`${key}:stack`, "Stack trace", h("pre", { class: "stack" }, String(err.stack))));
  return box;
}

const isErrorMemo = (memo) => isObject(memo) && "error" in memo && !("data" in memo);
const isEvent = (value) => isObject(value) && typeof value.name === "string" && "data" in value;

/** A step's memo: {"data": …}, {"error": …}, null, or an event. */
function memoView(step, key) {
  const memo = step.output;
  if (memo === null || memo === undefined) {
    if (step.kind === "wait_for_event") return h("p", { class: "muted small" }, "Timed out: no matching event arrived.");
    return null;
  }
  if (isErrorMemo(memo)) return errorView(memo.error, key);
  const value = isObject(memo) && Object.keys(memo).length === 1 && "data" in memo ? memo.data : memo;
  if (isEvent(value)) {
    return h("div", { class: "memo-event" },
      h("span", { class: "muted small" }, "Received "), h("code", null, value.name),
      valueView(value, key, "Event"));
  }
  if (value === null && step.kind !== "run") return null;
  return valueView(value, key);
}

// ---------------------------------------------------------------- small widgets

function statusBadge(status, testid) {
  const name = status || "Unknown";
  return h("span", { class: `badge status-${name.toLowerCase()}`, "data-testid": testid }, name);
}

function chip(label, value, title) {
  return h("span", { class: "chip", title: title ?? null },
    h("span", { class: "chip-label" }, label), value === undefined ? null : h("span", { class: "chip-value" }, value));
}

function alertBox(message, kind = "error") {
  return h("div", { class: `alert alert-${kind}`, role: kind === "error" ? "alert" : "status" }, message);
}

function errorMessage(err) {
  if (err?.status === 404 && !err.fromBody) return "This server does not provide that API (404).";
  return err?.message || String(err);
}

function copyButton(text) {
  return h("button", {
    type: "button", class: "btn small ghost", title: "Copy to clipboard",
    onclick: async () => {
      try {
        await navigator.clipboard.writeText(text);
        toast("Copied");
      } catch {
        toast("Copy is not available here", "error");
      }
    },
  }, "Copy");
}

function toast(message, kind = "info") {
  const el = h("div", { class: `toast toast-${kind}` }, message);
  document.getElementById("toasts").append(el);
  setTimeout(() => el.remove(), kind === "error" ? 8000 : 3500);
}

/** Runs `fn` on every item with at most `limit` at a time. */
async function eachLimited(items, limit, fn) {
  const queue = [...items];
  const worker = async () => {
    while (queue.length) await fn(queue.shift());
  };
  await Promise.all(Array.from({ length: Math.min(limit, queue.length) }, worker));
}

/** Wraps an async refresh so calls never overlap; a call made while one is
 *  running makes it run once more afterwards. */
function serial(fn) {
  let running = null;
  let again = false;
  const run = () => {
    if (running) {
      again = true;
      return running;
    }
    running = (async () => {
      try {
        do {
          again = false;
          await fn();
        } while (again);
      } finally {
        running = null;
      }
    })();
    return running;
  };
  run.busy = () => running !== null;
  return run;
}

/** Merges a fresh first page into a list sorted by descending id (ULIDs):
 *  the page replaces everything at or above its oldest id, older pages stay. */
function mergeFirstPage(list, page, key) {
  if (page.length < PAGE) return page;
  const boundary = key(page[page.length - 1]);
  return [...page, ...list.filter((item) => key(item) < boundary)];
}

// ---------------------------------------------------------------- API

class ApiError extends Error {
  constructor(status, message, code, fromBody) {
    super(message);
    this.status = status;
    this.code = code;
    this.fromBody = fromBody;
  }
}

const session = { csrf: null, user: null, mode: null };
let redirecting = false;

async function api(path, { method = "GET", body, retried = false } = {}) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && session.csrf) headers["X-CSRF-Token"] = session.csrf;
  let response;
  try {
    response = await fetch(path, {
      method, headers, credentials: "same-origin",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch {
    setConnected(false);
    throw new ApiError(0, "Cannot reach the server.", "network", false);
  }
  setConnected(true);
  if (response.status === 401) {
    if (!redirecting) {
      redirecting = true;
      location.assign("/login");
    }
    throw new ApiError(401, "Signed out.", "unauthorized", false);
  }
  if (response.status === 403 && method !== "GET" && !retried) {
    // The CSRF token may have rotated: fetch it again and retry once.
    await loadSession();
    return api(path, { method, body, retried: true });
  }
  const text = await response.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    json = null;
  }
  if (!response.ok) {
    const message = json?.error || json?.message || `${response.status} ${response.statusText}`.trim();
    throw new ApiError(response.status, message, json?.code, Boolean(json?.error || json?.message));
  }
  return json;
}

/** `data` of a wrapped `/v1` answer. */
const getData = async (path) => (await api(path))?.data;

async function loadSession() {
  try {
    const data = await getData("/v1/session");
    session.csrf = data?.csrf ?? null;
    session.user = data?.user ?? null;
    session.mode = data?.mode ?? null;
  } catch (err) {
    if (err.status !== 404) console.warn("session:", err.message);
  }
}

// ---------------------------------------------------------------- functions (shared)

const fnStore = { list: [], byId: new Map(), at: 0, loading: null };

async function loadFunctions(maxAge = 30_000) {
  if (fnStore.at && Date.now() - fnStore.at < maxAge) return fnStore.list;
  fnStore.loading ??= fetchFunctions()
    .then((list) => {
      fnStore.list = list.sort((a, b) => a.appId.localeCompare(b.appId) || a.name.localeCompare(b.name));
      fnStore.byId = new Map(list.map((fn) => [fn.id, fn]));
      fnStore.at = Date.now();
      return fnStore.list;
    })
    .finally(() => {
      fnStore.loading = null;
    });
  return fnStore.loading;
}

/** `/v1/functions`; without it, `/dev` (dev mode), else the apps' ids. */
async function fetchFunctions() {
  const asList = (value) => (Array.isArray(value) ? value : value?.functions ?? []);
  try {
    return asList(await getData("/v1/functions")).map(normalizeFunction);
  } catch (err) {
    if (err.status !== 404) throw err;
  }
  try {
    return asList((await api("/dev"))?.functions).map(normalizeFunction);
  } catch (err) {
    if (err.status !== 404) throw err;
  }
  const apps = (await getData("/v1/apps")) ?? [];
  return apps.flatMap((app) => (app.functions ?? []).map((id) => normalizeFunction({ id, app_id: app.id })));
}

function normalizeFunction(raw) {
  const config = isObject(raw.config) ? raw.config : {};
  const id = String(raw.id ?? raw.function_id ?? config.id ?? "");
  return {
    id,
    name: String(raw.name || config.name || id),
    appId: String(raw.app_id ?? raw.appId ?? ""),
    version: raw.version ?? null,
    triggers: raw.triggers ?? config.triggers ?? [],
    sources: [raw, raw.flow, raw.flow_control, config].filter(isObject),
    raw,
  };
}

function functionName(id) {
  return fnStore.byId.get(id)?.name ?? id ?? "";
}

function functionLabel(id) {
  return h("span", { class: "fn-name", title: id }, functionName(id));
}

// ---------------------------------------------------------------- chrome: nav, live, server info

const live = { paused: false, connected: true };

function setConnected(ok) {
  if (live.connected === ok) return;
  live.connected = ok;
  renderLive();
}

function renderLive() {
  const button = document.getElementById("live");
  if (!button) return;
  const state = live.paused ? "paused" : live.connected ? "live" : "offline";
  button.dataset.state = state;
  button.setAttribute("aria-pressed", String(!live.paused));
  button.querySelector(".live-label").textContent = { live: "Live", paused: "Paused", offline: "Offline" }[state];
  button.title = live.paused ? "Live updates paused; click to resume" : "Live updates every 2 s; click to pause";
}

function highlightNav(key) {
  for (const link of document.querySelectorAll("[data-nav]")) {
    if (link.dataset.nav === key) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

/** Production logins get a sign-out button (`POST /logout`). */
function setupSignOut() {
  const button = document.getElementById("sign-out");
  button.hidden = !(session.mode === "production" && session.csrf);
  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      await fetch("/logout", { method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": session.csrf ?? "" } });
    } finally {
      location.assign("/login");
    }
  });
}

async function loadServerInfo() {
  try {
    const data = (await getData("/v1/status")) ?? {};
    const parts = [];
    if (data.version) parts.push(String(data.version).startsWith("v") ? data.version : `v${data.version}`);
    if (data.mode) parts.push(String(data.mode));
    if (data.retention) parts.push(`retention ${data.retention}`);
    const el = document.getElementById("server-info");
    el.textContent = parts.join(" · ");
    el.hidden = parts.length === 0;
  } catch {
    // The header simply stays without it.
  }
}

// ---------------------------------------------------------------- runs list

function runsView(ctx) {
  const filters = {
    function: ctx.query.get("function") ?? "",
    status: ctx.query.get("status") ?? "",
    range: ctx.query.get("range") ?? (ctx.query.get("since") || ctx.query.get("until") ? "custom" : ""),
    since: ctx.query.get("since") ?? "",
    until: ctx.query.get("until") ?? "",
  };
  const state = { runs: [], done: false, loaded: false, generation: 0, cache: new Map() };

  const searchResult = h("div", { class: "search-result" });
  const controls = runFilters(filters, () => {
    bulk.resetPreview();
    state.runs = [];
    state.done = false;
    state.loaded = false;
    state.generation += 1;
    writeQuery(filters);
    render();
    refresh();
  });
  const tbody = h("tbody");
  const table = h("table", { class: "table runs-table" },
    h("thead", null, h("tr", null, ["Status", "Run", "Function", "Started", "Duration", "Note"].map((t) => h("th", { scope: "col" }, t)))),
    tbody);
  const empty = h("p", { class: "empty", hidden: true });
  const errorSlot = h("div");
  const more = h("button", { type: "button", class: "btn", hidden: true, onclick: () => loadMore() }, "Load more");

  const bulk = bulkPanel(filters, () => {
    state.generation += 1;
    refresh();
  });
  ctx.root.append(
    h("div", { class: "view-head" }, h("h1", null, "Runs"), searchForm(searchResult)),
    searchResult, controls.element, bulk, errorSlot, table, empty, h("div", { class: "more" }, more),
  );
  render();

  function render() {
    const rows = state.runs;
    reconcile(tbody, rows.map((run) => keyed(state.cache, run.run_id, JSON.stringify(run) + functionName(run.function_id), () => runRow(run))));
    prune(state.cache, rows.map((run) => run.run_id));
    table.hidden = rows.length === 0;
    empty.hidden = rows.length > 0;
    empty.textContent = !state.loaded ? "Loading…"
      : filters.function || filters.status || filters.range ? "No runs match these filters." : "No runs yet. Send an event to start one.";
    more.hidden = !state.loaded || state.done;
  }

  async function fetchPage(cursor) {
    const generation = state.generation;
    const page = (await getData(runsQuery(filters, cursor))) ?? [];
    return generation === state.generation && ctx.alive() ? page : null;
  }

  const refresh = serial(async () => {
    loadFunctions().then(() => ctx.alive() && (controls.fillFunctions(), render())).catch(() => {});
    try {
      const page = await fetchPage(null);
      if (!page) return;
      errorSlot.replaceChildren();
      state.runs = mergeFirstPage(state.runs, page, (run) => run.run_id);
      if (page.length < PAGE) state.done = true;
      state.loaded = true;
      render();
    } catch (err) {
      if (ctx.alive()) errorSlot.replaceChildren(alertBox(errorMessage(err)));
    }
  });

  async function loadMore() {
    const last = state.runs[state.runs.length - 1];
    if (!last) return;
    more.disabled = true;
    try {
      const page = await fetchPage(last.run_id);
      if (!page) return;
      const known = new Set(state.runs.map((run) => run.run_id));
      state.runs.push(...page.filter((run) => !known.has(run.run_id)));
      state.done = page.length < PAGE;
      render();
    } catch (err) {
      toast(errorMessage(err), "error");
    } finally {
      more.disabled = false;
    }
  }

  return { title: "Runs", refresh };
}

/** Cancel or replay every run matching the list's filters and a CEL
 *  expression over the triggering event: preview the count, confirm, then
 *  follow the progress. */
function bulkPanel(filters, onDone) {
  const expression = h("input", {
    type: "text", id: "bulk-expression", "data-testid": "bulk-expression", spellcheck: "false",
    placeholder: "event.data.customer == \"acme\"", "aria-label": "CEL expression over the triggering event",
  });
  const result = h("div", { class: "bulk-result", "data-testid": "bulk-result", role: "status" });
  const preview = h("button", { type: "button", class: "btn", "data-testid": "bulk-preview" }, "Preview");
  const cancel = h("button", { type: "button", class: "btn danger", "data-testid": "bulk-cancel", disabled: true }, "Cancel matching runs");
  const replay = h("button", { type: "button", class: "btn", "data-testid": "bulk-replay", disabled: true }, "Replay matching runs");
  let previewed = null;

  const request = (action, dryRun) => {
    const span = timeWindow(filters);
    const body = { action, dry_run: dryRun };
    if (filters.function) body.function_id = filters.function;
    if (filters.status) body.status = filters.status;
    if (span.since !== null) body.since = new Date(span.since).toISOString();
    if (span.until !== null) body.until = new Date(span.until).toISOString();
    if (expression.value.trim()) body.if = expression.value.trim();
    return body;
  };
  const reset = () => {
    previewed = null;
    cancel.disabled = replay.disabled = true;
  };
  expression.addEventListener("input", reset);

  preview.addEventListener("click", () => act(preview, "Counting…", async () => {
    const answer = (await api("/v1/runs/bulk", { method: "POST", body: request("cancel", true) }))?.data;
    previewed = answer?.matched ?? 0;
    const parts = Object.entries(answer?.by_status ?? {}).map(([status, n]) => `${n} ${status}`);
    result.replaceChildren(h("p", { "data-testid": "bulk-count", "data-count": String(previewed) },
      `${plural(previewed, "run")} match`, parts.length ? ` (${parts.join(", ")})` : "", "."));
    cancel.disabled = replay.disabled = previewed === 0;
    cancel.textContent = `Cancel ${plural(previewed, "run")}`;
    replay.textContent = `Replay ${plural(previewed, "run")}`;
  }));

  const run = (button, action, verb) => act(button, `${verb}…`, async () => {
    if (previewed === null) return;
    if (!confirm(`${verb} ${plural(previewed, "run")}?`)) return;
    let progress = (await api("/v1/runs/bulk", { method: "POST", body: request(action, false) }))?.data;
    const bar = h("progress", { class: "bulk-progress", max: String(Math.max(progress?.matched ?? 0, 1)), value: "0", "data-testid": "bulk-progress" });
    const text = h("span");
    result.replaceChildren(h("p", null, bar, " ", text));
    while (progress) {
      bar.value = progress.done;
      text.textContent = `${progress.done} of ${progress.matched} done, ${progress.changed} ${action === "cancel" ? "cancelled" : "replayed"}${progress.failed ? `, ${progress.failed} failed` : ""}`;
      if (progress.state !== "running") break;
      await new Promise((resolve) => setTimeout(resolve, 300));
      progress = await getData(`/v1/runs/bulk/${enc(progress.id)}`);
    }
    result.append(h("p", { "data-testid": "bulk-done", "data-changed": String(progress?.changed ?? 0) },
      progress?.failed ? `Finished with failures: ${(progress.errors ?? [])[0] ?? ""}` : "Done."));
    reset();
    onDone();
  });
  cancel.addEventListener("click", () => run(cancel, "cancel", "Cancel"));
  replay.addEventListener("click", () => run(replay, "replay", "Replay"));

  const panel = collapsible("runs:bulk", "Bulk actions: cancel or replay every run matching these filters",
    h("div", { class: "bulk", "data-testid": "bulk" },
      h("form", { class: "bulk-form", onsubmit: (e) => e.preventDefault() },
        field("And where (CEL over the triggering event)", expression), preview, cancel, replay),
      result));
  // The list's filters changed: the count no longer holds.
  panel.resetPreview = () => {
    reset();
    result.replaceChildren();
  };
  panel.setAttribute("data-testid", "bulk-panel");
  return panel;
}

function runsQuery(filters, cursor) {
  const query = new URLSearchParams({ limit: String(PAGE) });
  if (filters.function) query.set("function_id", filters.function);
  if (filters.status) query.set("status", filters.status);
  const span = timeWindow(filters);
  if (span.since !== null) query.set("since", new Date(span.since).toISOString());
  if (span.until !== null) query.set("until", new Date(span.until).toISOString());
  if (cursor) query.set("cursor", cursor);
  return `/v1/runs?${query}`;
}

/** {since, until} in ms (or null) for the filters' time range. */
function timeWindow(filters) {
  if (RANGE_MS[filters.range]) return { since: Date.now() - RANGE_MS[filters.range], until: null };
  if (filters.range !== "custom") return { since: null, until: null };
  const at = (text) => (text ? parseTime(text) ?? new Date(text).getTime() : null);
  const since = at(filters.since);
  const until = at(filters.until);
  return { since: Number.isFinite(since) ? since : null, until: Number.isFinite(until) ? until : null };
}

function writeQuery(filters) {
  const query = new URLSearchParams();
  for (const [key, value] of Object.entries(filters)) {
    if (value && (filters.range === "custom" || (key !== "since" && key !== "until"))) query.set(key, value);
  }
  const text = query.toString();
  history.replaceState(null, "", `#/runs${text ? `?${text}` : ""}`);
}

function runFilters(filters, onChange) {
  const fnSelect = h("select", { id: "filter-function", "data-testid": "filter-function" });
  const statusSelect = h("select", { id: "filter-status", "data-testid": "filter-status" },
    h("option", { value: "" }, "All statuses"),
    STATUSES.map((s) => h("option", { value: s, selected: s === filters.status }, s)));
  const rangeSelect = h("select", { id: "filter-range", "data-testid": "filter-range" },
    RANGES.map(([value, label]) => h("option", { value, selected: value === filters.range }, label)));
  const since = h("input", { id: "filter-since", type: "datetime-local", value: toLocalInput(filters.since), "data-testid": "filter-since" });
  const until = h("input", { id: "filter-until", type: "datetime-local", value: toLocalInput(filters.until), "data-testid": "filter-until" });
  const custom = h("div", { class: "custom-range", hidden: filters.range !== "custom" },
    field("From", since), field("To", until));
  const clear = h("button", { type: "button", class: "btn ghost" }, "Clear");

  const changed = () => {
    filters.function = fnSelect.value;
    filters.status = statusSelect.value;
    filters.range = rangeSelect.value;
    filters.since = fromLocalInput(since.value);
    filters.until = fromLocalInput(until.value);
    custom.hidden = filters.range !== "custom";
    onChange();
  };
  for (const input of [fnSelect, statusSelect, rangeSelect, since, until]) input.addEventListener("change", changed);
  clear.addEventListener("click", () => {
    fnSelect.value = statusSelect.value = rangeSelect.value = since.value = until.value = "";
    changed();
  });

  let filledAt = null;
  function fillFunctions() {
    // Only when the list changed: rebuilding would close an open select.
    if (filledAt === fnStore.at) return;
    filledAt = fnStore.at;
    const options = [h("option", { value: "" }, "All functions")];
    const ids = new Set(fnStore.list.map((fn) => fn.id));
    for (const fn of fnStore.list) {
      options.push(h("option", { value: fn.id }, fn.name === fn.id ? fn.id : `${fn.name} (${fn.id})`));
    }
    if (filters.function && !ids.has(filters.function)) options.push(h("option", { value: filters.function }, filters.function));
    fnSelect.replaceChildren(...options);
    fnSelect.value = filters.function;
  }
  fillFunctions();

  const element = h("form", { class: "filters", "aria-label": "Filter runs", onsubmit: (e) => e.preventDefault() },
    field("Function", fnSelect), field("Status", statusSelect), field("Time", rangeSelect), custom, clear);
  return { element, fillFunctions };
}

function field(label, input) {
  return h("label", { class: "field" }, h("span", { class: "field-label" }, label), input);
}

/** RFC 3339 → the value of a datetime-local input (local time). */
function toLocalInput(iso) {
  const t = parseTime(iso);
  if (t === null) return "";
  const date = new Date(t - new Date(t).getTimezoneOffset() * 60e3);
  return date.toISOString().slice(0, 16);
}

/** A datetime-local value (local time) → RFC 3339. */
function fromLocalInput(value) {
  if (!value) return "";
  const t = new Date(value).getTime();
  return Number.isFinite(t) ? new Date(t).toISOString() : "";
}

function runRow(run) {
  const href = runHref(run.run_id);
  return h("tr", {
    class: "run-row clickable", "data-testid": "run-row", "data-run-id": run.run_id, "data-status": run.status,
    onclick: (event) => {
      if (!event.target.closest("a, button") && !window.getSelection()?.toString()) location.hash = href;
    },
  },
  h("td", { "data-label": "Status" }, statusBadge(run.status, "run-status")),
  h("td", { "data-label": "Run" }, h("a", { href, class: "mono run-id" }, run.run_id)),
  h("td", { "data-label": "Function" }, functionLabel(run.function_id)),
  h("td", { "data-label": "Started" }, timeEl(run.run_started_at)),
  h("td", { "data-label": "Duration" }, runDuration(run)),
  h("td", { "data-label": "Note", class: "note" }, runNote(run)));
}

function runDuration(run) {
  const start = parseTime(run.run_started_at);
  const end = parseTime(run.ended_at);
  if (start === null || run.status === "Skipped") return h("span", { class: "muted" }, "—");
  if (end !== null) return fmtDuration(end - start);
  if (run.status === "Running") return elapsedEl(start);
  return h("span", { class: "muted" }, "—");
}

function runNote(run) {
  if (run.skip_reason) return h("span", { class: "note-skip" }, `skipped: ${run.skip_reason}`);
  if (run.delayed_by) return h("span", { class: "note-delay" }, `delayed by ${run.delayed_by}`);
  return null;
}

function searchForm(resultSlot) {
  const input = h("input", {
    type: "search", id: "run-search", "data-testid": "run-search", placeholder: "Find a run ID or event ID",
    "aria-label": "Run ID or event ID", autocomplete: "off", spellcheck: "false",
  });
  return h("form", {
    class: "search", role: "search",
    onsubmit: (event) => {
      event.preventDefault();
      findById(input.value.trim(), resultSlot);
    },
  }, input, h("button", { type: "submit", class: "btn" }, "Find"));
}

/** A run id opens the run; an event id lists the runs it started. */
async function findById(id, slot) {
  if (!id) return slot.replaceChildren();
  slot.replaceChildren(h("p", { class: "muted" }, "Searching…"));
  try {
    const run = await getData(`/v1/runs/${enc(id)}`).catch((err) => (err.status === 404 ? null : Promise.reject(err)));
    if (run) return (location.hash = runHref(id));
    const runs = (await getData(`/v1/events/${enc(id)}/runs`).catch((err) => (err.status === 404 ? [] : Promise.reject(err)))) ?? [];
    if (runs.length === 1) return (location.hash = runHref(runs[0].run_id));
    if (runs.length > 1) {
      return slot.replaceChildren(h("div", { class: "card" },
        h("p", null, `Event ${id} started ${plural(runs.length, "run")}:`), eventRunsList(runs)));
    }
    const event = await getData(`/v1/events/${enc(id)}`).catch((err) => (err.status === 404 ? null : Promise.reject(err)));
    slot.replaceChildren(alertBox(event
      ? `Event ${event.name ?? id} (${id}) started no run.`
      : `No run or event has the id “${id}”.`, "info"));
  } catch (err) {
    slot.replaceChildren(alertBox(errorMessage(err)));
  }
}

// ---------------------------------------------------------------- one run

const eventCache = new Map();

function fetchEvent(id) {
  if (!eventCache.has(id)) {
    const promise = getData(`/v1/events/${enc(id)}`).catch((err) => {
      eventCache.delete(id);
      throw err;
    });
    eventCache.set(id, promise);
  }
  return eventCache.get(id);
}

function runView(ctx) {
  const id = ctx.params[0];
  let signature = null;
  let eventIds = null;
  const head = h("div", { class: "run-head" });
  const errorSlot = h("div");
  const alerts = h("div");
  const facts = h("dl", { class: "facts" });
  const timeline = h("ol", { class: "timeline", "data-testid": "timeline", "aria-label": "Timeline" });
  const traceSlot = h("div", { class: "trace-slot" });
  let traceSignature = null;
  const output = h("div", { class: "output" });
  const metadata = h("div", { class: "run-metadata" });
  const metadataCard = h("section", { class: "card", "aria-labelledby": "metadata-title", "data-testid": "run-metadata", hidden: true },
    h("h2", { id: "metadata-title" }, "Metadata"), metadata);
  const events = h("div", { class: "run-events" });
  const cancel = h("button", { type: "button", class: "btn danger", "data-testid": "cancel-run", hidden: true, onclick: () => cancelRun() }, "Cancel run");
  const replay = h("button", { type: "button", class: "btn", "data-testid": "replay-run", hidden: true, onclick: () => replayRun() }, "Replay");
  const body = h("div", { class: "run-layout", hidden: true },
    h("section", { class: "card timeline-card", "aria-labelledby": "timeline-title" }, h("h2", { id: "timeline-title" }, "Timeline"), timeline),
    h("div", { class: "run-side" },
      h("section", { class: "card", "aria-labelledby": "output-title" }, h("h2", { id: "output-title" }, "Output"), output),
      metadataCard,
      h("section", { class: "card", "aria-labelledby": "events-title" }, h("h2", { id: "events-title" }, "Triggering events"), events)));

  const traceCard = h("section", { class: "card trace-card", "aria-labelledby": "trace-title", hidden: true },
    h("h2", { id: "trace-title" }, "Trace"), traceSlot);
  ctx.root.append(h("a", { href: "#/runs", class: "back" }, "← Runs"), head, errorSlot, alerts, facts, traceCard, body);

  const refresh = serial(async () => {
    let run;
    try {
      // Function names come with the functions list; the run shows without it.
      [run] = await Promise.all([getData(`/v1/runs/${enc(id)}`), loadFunctions().catch(() => null)]);
    } catch (err) {
      if (!ctx.alive()) return;
      const message = err.status === 404 && err.fromBody ? `Run ${id} was not found.` : errorMessage(err);
      if (!signature) head.replaceChildren(h("h1", null, "Run"), h("p", { class: "mono muted" }, id));
      errorSlot.replaceChildren(alertBox(message));
      return;
    }
    if (!ctx.alive()) return;
    errorSlot.replaceChildren();
    refreshTrace();
    const next = JSON.stringify(run) + functionName(run.function_id);
    if (next === signature) return;
    render(run);
    signature = next;
  });

  function render(run) {
    document.title = `${functionName(run.function_id)} · Run · Baton`;
    head.replaceChildren(
      h("div", { class: "run-title" },
        h("h1", null, functionLabel(run.function_id)), statusBadge(run.status, "run-status")),
      h("div", { class: "run-id-line" }, h("span", { class: "mono" }, run.run_id), copyButton(run.run_id)),
      h("div", { class: "actions" }, cancel, replay));
    cancel.hidden = !(run.status === "Queued" || run.status === "Running");
    replay.hidden = !["Failed", "Cancelled", "Completed"].includes(run.status);
    alerts.replaceChildren(...runAlerts(run));
    facts.replaceChildren(...runFacts(run));
    reconcile(timeline, timelineEntries(run));
    output.replaceChildren(runOutput(run));
    const runMetadata = run.metadata ?? [];
    metadataCard.hidden = runMetadata.length === 0;
    metadata.replaceChildren(metadataView(runMetadata, `run:${run.run_id}:metadata`));
    const ids = JSON.stringify(run.event_ids ?? []);
    if (ids !== eventIds) {
      eventIds = ids;
      renderEvents(run.event_ids ?? []);
    }
    body.hidden = false;
  }

  async function refreshTrace() {
    try {
      const trace = await getData(`/v1/runs/${enc(id)}/trace`);
      if (!ctx.alive() || !trace) return;
      // Open spans grow with the clock: re-render while something goes on.
      const next = JSON.stringify(trace.spans) + (trace.spans.some((s) => !s.end) ? trace.now : "");
      if (next === traceSignature) return;
      traceSignature = next;
      traceSlot.replaceChildren(traceView(trace));
      traceCard.hidden = false;
    } catch (err) {
      if (err.status !== 404 && ctx.alive()) traceSlot.replaceChildren(alertBox(errorMessage(err)));
    }
  }

  async function renderEvents(ids) {
    if (!ids.length) return events.replaceChildren(h("p", { class: "muted" }, "None recorded."));
    const shown = ids.slice(0, 20);
    const cards = shown.map((eventId) => h("div", { class: "event-card" }, h("p", { class: "muted mono small" }, eventId)));
    events.replaceChildren(...cards);
    if (ids.length > shown.length) events.append(h("p", { class: "muted" }, `and ${ids.length - shown.length} more`));
    await Promise.all(shown.map(async (eventId, i) => {
      try {
        const event = await fetchEvent(eventId);
        if (ctx.alive()) cards[i].replaceChildren(...eventSummary(event, eventId, shown.length === 1));
      } catch (err) {
        if (ctx.alive()) cards[i].append(alertBox(errorMessage(err)));
      }
    }));
  }

  async function cancelRun() {
    await act(cancel, "Cancelling…", async () => {
      await api(`/v1/runs/${enc(id)}`, { method: "DELETE" });
      toast("Run cancelled");
      signature = null;
      await refresh();
    });
  }

  async function replayRun() {
    await act(replay, "Replaying…", async () => {
      const answer = await api(`/v1/runs/${enc(id)}/replay`, { method: "POST", body: {} });
      const newId = answer?.data?.run_id ?? answer?.run_id;
      if (!newId) throw new Error("The server did not say which run it started.");
      toast(`Replaying as run ${newId}`);
      location.hash = runHref(newId);
    });
  }

  return { title: "Run", refresh };
}

/** Disables `button` while `work` runs; shows failures as a toast. */
async function act(button, busyLabel, work) {
  const label = button.textContent;
  button.disabled = true;
  button.textContent = busyLabel;
  try {
    await work();
  } catch (err) {
    toast(errorMessage(err), "error");
  } finally {
    button.disabled = false;
    button.textContent = label;
  }
}

function runAlerts(run) {
  const alerts = [];
  if (run.skip_reason) alerts.push(alertBox(`Skipped by ${run.skip_reason}.`, "skip"));
  if (run.delayed_by) alerts.push(alertBox(`Start delayed by ${run.delayed_by}.`, "info"));
  return alerts;
}

function runFacts(run) {
  const start = parseTime(run.run_started_at);
  const end = parseTime(run.ended_at);
  const fn = fnStore.byId.get(run.function_id);
  const rows = [
    ["Function", h("a", { href: `#/runs?function=${enc(run.function_id)}`, class: "mono" }, run.function_id)],
    ["App", run.app_id || "—"],
    ["Version", run.function_version ?? fn?.version ?? "—"],
    ["Started", start === null ? "—" : h("span", null, timeEl(run.run_started_at, false), " (", timeEl(run.run_started_at), ")")],
    ["Ended", end === null ? "—" : timeEl(run.ended_at, false)],
    ["Duration", start === null || run.status === "Skipped" ? "—" : end !== null ? fmtDuration(end - start) : run.status === "Running" ? elapsedEl(start) : "—"],
  ];
  return rows.flatMap(([term, value]) => [h("dt", null, term), h("dd", null, value)]);
}

function runOutput(run) {
  const value = run.output;
  if (value === null || value === undefined) {
    return h("p", { class: "muted" }, ENDED.has(run.status) ? "No output." : "Not finished yet.");
  }
  if (run.status === "Failed" || run.status === "Cancelled") {
    if (isObject(value) && isObject(value.error)) return errorView(value.error, `run:${run.run_id}:output`);
    if (isObject(value) && (value.message || value.name)) return errorView(value, `run:${run.run_id}:output`);
  }
  return jsonView(isObject(value) && Object.keys(value).length === 1 && "data" in value ? value.data : value);
}

function eventSummary(event, eventId, open) {
  return [
    h("div", { class: "event-card-head" },
      h("a", { href: `#/events?name=${enc(event?.name ?? "")}`, class: "event-name mono" }, event?.name ?? "(unnamed)"),
      timeEl(event?.received_at)),
    h("p", { class: "muted mono small" }, eventId),
    collapsible(`event:${eventId}`, "Payload", jsonView(eventPayload(event)), open),
  ];
}

/** The event as sent, without the fields Baton adds. */
function eventPayload(event) {
  if (!isObject(event)) return event;
  const { internal_id: _internal, received_at: _received, ...payload } = event;
  return payload;
}

// ---------------------------------------------------------------- trace

const TRACE_KIND_LABEL = { queued: "queued", run: "step", sleep: "sleep", wait: "wait", invoke: "invoke", fetch: "fetch", function: "code", defer: "defer" };

/** A run's spans on one time axis: one row per step, one segment per
 *  attempt (failed ones red, with their error), sleeps and waits hatched,
 *  what goes on striped up to now. Bars keep a minimum width, and every
 *  row also says its duration, so a 30 ms step stays visible in a run that
 *  slept for days. */
function traceView(trace) {
  const spans = trace.spans ?? [];
  const now = parseTime(trace.now) ?? Date.now();
  const t0 = Math.min(parseTime(trace.start) ?? now, ...spans.map((s) => parseTime(s.start) ?? now));
  const ends = spans.map((s) => parseTime(s.end) ?? now);
  const t1 = Math.max(parseTime(trace.end) ?? 0, ...ends, t0 + 1);
  const total = t1 - t0;
  const pct = (t) => `${(((t - t0) / total) * 100).toFixed(3)}%`;
  const widthPct = (a, b) => `max(3px, ${(((b - a) / total) * 100).toFixed(3)}%)`;

  const ticks = [0, 0.25, 0.5, 0.75, 1].map((f) =>
    h("span", { class: "trace-tick", style: { left: `${f * 100}%` } }, f === 0 ? "0" : `+${fmtDuration(total * f)}`));
  const axis = h("div", { class: "trace-row trace-axis", "aria-hidden": "true" },
    h("div", { class: "trace-label" }, `${plural(spans.length, "span")} · ${fmtDuration(total)}`),
    h("div", { class: "trace-track" }, ticks),
    h("div", { class: "trace-dur" }, ""));

  const rows = spans.map((span) => {
    const start = parseTime(span.start) ?? t0;
    const end = parseTime(span.end) ?? now;
    const open = !span.end;
    const bars = [];
    const attempts = span.attempts ?? [];
    if (attempts.length > 0) {
      // The span's extent as a thin line, each attempt a block on it.
      bars.push(h("span", { class: "trace-extent", style: { left: pct(start), width: widthPct(start, end) } }));
      attempts.forEach((attempt, i) => {
        const a = parseTime(attempt.start) ?? start;
        const b = parseTime(attempt.end) ?? a;
        const title = `attempt ${i + 1}: ${fmtDuration(b - a)}${attempt.error ? ` · ${attempt.error}` : ""}`;
        bars.push(h("span", {
          class: `trace-bar trace-attempt ${attempt.error ? "trace-error" : "trace-ok"}`,
          style: { left: pct(a), width: widthPct(a, b) }, title,
          "data-testid": "trace-attempt", "data-error": attempt.error ?? "",
        }));
      });
      if (open) {
        const since = parseTime(attempts[attempts.length - 1].end) ?? start;
        bars.push(h("span", { class: "trace-bar trace-open", style: { left: pct(since), width: widthPct(since, end) } }));
      }
    } else {
      bars.push(h("span", {
        class: `trace-bar trace-${span.kind} trace-status-${span.status}${open ? " trace-open" : ""}`,
        style: { left: pct(start), width: widthPct(start, end) },
        title: `${span.name}: ${fmtDuration(end - start)}${open ? " so far" : ""}`,
      }));
    }
    const note = traceNote(span);
    return h("div", {
      class: `trace-row trace-row-${span.kind}`, role: "listitem", "data-testid": "trace-row",
      "data-span-name": span.name, "data-kind": span.kind, "data-status": span.status,
    },
    h("div", { class: "trace-label" },
      h("span", { class: `kind kind-${span.kind === "run" ? "run" : span.kind}` }, TRACE_KIND_LABEL[span.kind] ?? span.kind),
      h("span", { class: "trace-name", title: span.name }, span.name),
      note),
    h("div", { class: "trace-track" }, bars),
    h("div", { class: `trace-dur trace-status-text-${span.status}` },
      open ? h("span", null, span.status, " ", elapsedEl(start)) : fmtDuration(end - start),
      attempts.length > 1 ? h("span", { class: "warn" }, ` · ${plural(attempts.length, "attempt")}`) : null));
  });
  return h("div", { class: "trace", "data-testid": "trace", role: "list", "aria-label": "Trace" }, axis, rows);
}

/** What a wait waits for, the child run of an invoke, why a step failed. */
function traceNote(span) {
  const detail = span.detail ?? {};
  if (span.kind === "wait") {
    const parts = detail.signal != null
      ? [" for signal ", h("code", null, detail.signal)]
      : [" for ", h("code", null, detail.event ?? "?")];
    if (detail.if) parts.push(" if ", h("code", null, detail.if));
    if (detail.expires_at) parts.push(" until ", timeEl(detail.expires_at, false));
    else if (detail.timeout) parts.push(` (timeout ${detail.timeout})`);
    if (span.status === "timed_out") parts.push(" — timed out");
    return h("span", { class: "trace-note", "data-testid": "trace-wait" }, parts);
  }
  if (span.kind === "invoke" || span.kind === "defer") {
    const child = detail.child_run_id;
    return h("span", { class: "trace-note" },
      detail.function_id ? [" ", h("code", null, detail.function_id)] : null,
      child ? [" → ", h("a", { href: runHref(child), class: "mono", "data-testid": "trace-child-run" }, "child run")] : null);
  }
  if (span.kind === "sleep" && detail.duration) return h("span", { class: "trace-note" }, ` ${detail.duration}`);
  const failed = (span.attempts ?? []).filter((a) => a.error);
  if (failed.length) return h("span", { class: "trace-note trace-note-error", title: failed[failed.length - 1].error }, ` ${failed[failed.length - 1].error}`);
  return null;
}

// ---------------------------------------------------------------- timeline

function timelineEntries(run) {
  const start = parseTime(run.run_started_at);
  const steps = [...(run.steps ?? [])].sort((a, b) => (parseTime(a.saved_at) ?? 0) - (parseTime(b.saved_at) ?? 0));
  const entries = [startEntry(run)];
  let previous = start;
  steps.forEach((step, i) => {
    const at = parseTime(step.saved_at);
    entries.push(stepEntry(run, step, i, previous === null || at === null ? null : at - previous, i === 0));
    if (at !== null) previous = at;
  });
  if (!ENDED.has(run.status)) entries.push(...pendingEntries(run, previous));
  if (run.ended_at) entries.push(endEntry(run, previous));
  return entries;
}

function startEntry(run) {
  const label = { Queued: "Queued", Skipped: "Received" }[run.status] ?? "Started";
  return h("li", { class: "tl-item tl-start", "data-testid": "timeline-marker" },
    h("div", { class: "tl-marker", "aria-hidden": "true" }),
    h("div", { class: "tl-body" },
      h("div", { class: "tl-head" }, h("span", { class: "tl-title" }, label),
        h("span", { class: "tl-time" }, timeEl(run.run_started_at, false)))));
}

function stepEntry(run, step, index, sincePrevious, first) {
  const failed = step.kind === "failed" || isErrorMemo(step.output);
  const attempts = Number(step.attempts) || 0;
  const meta = [];
  if (sincePrevious !== null) {
    meta.push(h("span", { title: first ? "since the run started" : "since the previous step" }, `+${fmtDuration(sincePrevious)}`));
  }
  if (attempts > 0) meta.push(h("span", { class: attempts > 1 ? "warn" : null }, plural(attempts, "attempt")));
  return h("li", {
    class: `tl-item tl-step ${failed ? "tl-failed" : "tl-done"}`, "data-testid": "timeline-step",
    "data-step-name": step.name ?? "", "data-step-kind": step.kind ?? "", "data-step-id": step.id ?? "",
  },
  h("div", { class: "tl-marker", "aria-hidden": "true" }),
  h("div", { class: "tl-body" },
    h("div", { class: "tl-head" },
      h("span", { class: `kind kind-${step.kind}` }, String(step.kind ?? "step").replaceAll("_", " ")),
      h("span", { class: "tl-title" }, step.name || step.id || `step ${index + 1}`),
      h("span", { class: "tl-time" }, timeEl(step.saved_at, false))),
    meta.length ? h("div", { class: "tl-meta" }, meta) : null,
    memoView(step, `step:${run.run_id}:${step.id ?? index}`),
    step.metadata?.length
      ? collapsible(`step:${run.run_id}:${step.id ?? index}:metadata`, `Metadata · ${plural(step.metadata.length, "kind")}`,
        metadataView(step.metadata, `step:${run.run_id}:${step.id ?? index}:metadata`), true)
      : null));
}

/** Metadata of a run or a step: one block per kind, scores as chips. */
function metadataView(entries, key) {
  return h("div", { class: "metadata-list" }, entries.map((entry, i) => {
    const values = isObject(entry.values) ? entry.values : {};
    let body;
    if (entry.kind === "inngest.score") {
      body = h("div", { class: "chip-row" }, Object.entries(values).map(([name, score]) =>
        chip(name, String(isObject(score) ? score.value : score))));
    } else {
      body = valueView(values, `${key}:${i}`, "Values");
    }
    return h("div", { class: "metadata-entry", "data-testid": "metadata-entry", "data-kind": entry.kind ?? "", "data-scope": entry.scope ?? "" },
      h("div", { class: "metadata-head" },
        h("code", null, entry.kind ?? "?"),
        h("span", { class: "muted small" }, [entry.scope, entry.span_id ? `span ${entry.span_id}` : null].filter(Boolean).join(" · ")),
        entry.updated_at ? h("span", { class: "muted small" }, timeEl(entry.updated_at)) : null),
      body);
  }));
}

function pendingEntries(run, lastAt) {
  const pauses = run.pauses ?? [];
  const entries = [];
  const waits = pauses.filter((p) => p.kind === "wait_for_event" || p.kind === "invoke");
  for (const pause of waits) entries.push(pauseEntry(pause));
  if (run.status === "Queued") {
    entries.push(pendingEntry("queued", "Queued", "Waiting to start", run.delayed_by ? `delayed by ${run.delayed_by}` : null, lastAt));
  } else if (run.status === "Running" && waits.length === 0) {
    entries.push(pendingEntry("sleep", "In progress", "Sleeping or running the next step", null, lastAt));
  }
  for (const pause of pauses.filter((p) => p.kind === "cancel")) entries.push(pauseEntry(pause));
  return entries;
}

function pendingEntry(kind, label, text, note, since) {
  return h("li", { class: "tl-item tl-pending", "data-testid": "timeline-pending", "data-step-kind": kind },
    h("div", { class: "tl-marker", "aria-hidden": "true" }),
    h("div", { class: "tl-body" },
      h("div", { class: "tl-head" }, h("span", { class: "kind kind-pending" }, label), h("span", { class: "tl-title" }, text)),
      h("div", { class: "tl-meta" }, since === null ? null : h("span", null, "for ", elapsedEl(since)), note ? h("span", null, note) : null)));
}

function pauseEntry(pause) {
  const until = parseTime(pause.expires_at);
  const untilText = until === null ? null : h("span", null, "until ", timeEl(pause.expires_at, false), " (", timeEl(pause.expires_at), ")");
  let text;
  if (pause.kind === "wait_for_event") text = ["Waiting for event ", h("code", null, pause.event ?? "?")];
  else if (pause.kind === "invoke") text = ["Waiting for the invoked function to finish"];
  else text = ["Cancelled if event ", h("code", null, pause.event ?? "?"), " arrives"];
  const cls = pause.kind === "cancel" ? "tl-item tl-pending tl-cancel-rule" : "tl-item tl-pending";
  return h("li", { class: cls, "data-testid": "timeline-pending", "data-step-kind": pause.kind, "data-step-name": pause.step ?? "" },
    h("div", { class: "tl-marker", "aria-hidden": "true" }),
    h("div", { class: "tl-body" },
      h("div", { class: "tl-head" },
        h("span", { class: "kind kind-pending" }, pause.kind === "cancel" ? "cancel rule" : "waiting"),
        h("span", { class: "tl-title" }, ...text)),
      h("div", { class: "tl-meta" },
        pause.step ? h("span", null, "step ", h("strong", null, pause.step)) : null,
        untilText),
      pause.if ? h("div", { class: "tl-if" }, h("span", { class: "muted small" }, "if "), h("code", null, pause.if)) : null));
}

function endEntry(run, lastAt) {
  const end = parseTime(run.ended_at);
  const start = parseTime(run.run_started_at);
  const meta = [];
  if (lastAt !== null && end !== null && lastAt !== start) meta.push(h("span", null, `+${fmtDuration(end - lastAt)}`));
  if (start !== null && end !== null) meta.push(h("span", null, `total ${fmtDuration(end - start)}`));
  let detail = null;
  if (run.status === "Failed") {
    const err = isObject(run.output?.error) ? run.output.error : run.output;
    if (isObject(err) && err.message) detail = h("p", { class: "tl-error" }, `${err.name || "Error"}: ${err.message}`);
  }
  if (run.skip_reason) detail = h("p", { class: "muted" }, `Skipped by ${run.skip_reason}`);
  return h("li", { class: `tl-item tl-end tl-end-${String(run.status).toLowerCase()}`, "data-testid": "timeline-marker" },
    h("div", { class: "tl-marker", "aria-hidden": "true" }),
    h("div", { class: "tl-body" },
      h("div", { class: "tl-head" }, statusBadge(run.status), h("span", { class: "tl-time" }, timeEl(run.ended_at, false))),
      meta.length ? h("div", { class: "tl-meta" }, meta) : null,
      detail));
}

// ---------------------------------------------------------------- events

function eventsView(ctx) {
  const state = {
    events: [], done: false, loaded: false, generation: 0, name: ctx.query.get("name") ?? "",
    runs: new Map(), flash: new Set(), cache: new Map(),
  };
  const list = h("div", { class: "event-list" });
  const empty = h("p", { class: "empty", hidden: true });
  const errorSlot = h("div");
  const more = h("button", { type: "button", class: "btn", hidden: true, onclick: () => loadMore() }, "Load more");
  const nameFilter = h("input", {
    type: "search", id: "filter-event-name", "data-testid": "filter-event-name", placeholder: "Exact event name",
    value: state.name, autocomplete: "off", spellcheck: "false",
  });
  nameFilter.addEventListener("change", () => {
    state.name = nameFilter.value.trim();
    state.events = [];
    state.done = state.loaded = false;
    state.generation += 1;
    history.replaceState(null, "", `#/events${state.name ? `?name=${enc(state.name)}` : ""}`);
    render();
    refresh();
  });

  ctx.root.append(
    h("div", { class: "view-head" }, h("h1", null, "Events"),
      h("form", { class: "filters inline", onsubmit: (e) => e.preventDefault() }, field("Name", nameFilter))),
    sendEventForm(async (ids) => {
      ids.forEach((id) => state.flash.add(id));
      await refresh();
      setTimeout(() => ids.forEach((id) => state.flash.delete(id)), 4000);
    }),
    errorSlot, list, empty, h("div", { class: "more" }, more));
  render();

  function render() {
    const nodes = state.events.map((event) => {
      const id = event.internal_id;
      const entry = state.runs.get(id);
      const sig = JSON.stringify([event.internal_id, event.received_at, entry?.runs ?? null, entry?.error ?? null, functionNamesOf(entry), state.flash.has(id)]);
      return keyed(state.cache, id, sig, () => eventRow(event, entry, state.flash.has(id)));
    });
    reconcile(list, nodes);
    const ids = state.events.map((event) => event.internal_id);
    prune(state.cache, ids);
    prune(state.runs, ids);
    empty.hidden = state.events.length > 0;
    empty.textContent = !state.loaded ? "Loading…"
      : state.name ? `No events named ${state.name}.` : "No events yet. Send one with the form above.";
    more.hidden = !state.loaded || state.done;
  }

  async function fetchPage(cursor) {
    const generation = state.generation;
    const query = new URLSearchParams({ limit: String(PAGE) });
    if (cursor) query.set("cursor", cursor);
    if (state.name) query.set("name", state.name);
    const page = (await getData(`/v1/events?${query}`)) ?? [];
    return generation === state.generation && ctx.alive() ? page : null;
  }

  const refresh = serial(async () => {
    loadFunctions().then(() => ctx.alive() && render()).catch(() => {});
    try {
      const page = await fetchPage(null);
      if (!page) return;
      errorSlot.replaceChildren();
      state.events = mergeFirstPage(state.events, page, (event) => event.internal_id);
      if (page.length < PAGE) state.done = true;
      state.loaded = true;
      render();
      await loadRuns();
      if (ctx.alive()) render();
    } catch (err) {
      if (ctx.alive()) errorSlot.replaceChildren(alertBox(errorMessage(err)));
    }
  });

  /** Runs of events that may still change: new, or with runs not ended. */
  async function loadRuns() {
    const now = Date.now();
    const stale = state.events.filter((event) => {
      const entry = state.runs.get(event.internal_id);
      if (!entry || entry.error) return true;
      if (entry.runs.some((run) => !ENDED.has(run.status))) return true;
      return entry.runs.length === 0 && now - (parseTime(event.received_at) ?? 0) < 5 * 60e3;
    });
    await eachLimited(stale, 6, async (event) => {
      try {
        const runs = (await getData(`/v1/events/${enc(event.internal_id)}/runs`)) ?? [];
        state.runs.set(event.internal_id, { runs });
      } catch (err) {
        state.runs.set(event.internal_id, { runs: [], error: errorMessage(err) });
      }
    });
  }

  async function loadMore() {
    const last = state.events[state.events.length - 1];
    if (!last) return;
    more.disabled = true;
    try {
      const page = await fetchPage(last.internal_id);
      if (!page) return;
      const known = new Set(state.events.map((event) => event.internal_id));
      state.events.push(...page.filter((event) => !known.has(event.internal_id)));
      state.done = page.length < PAGE;
      render();
      await loadRuns();
      render();
    } catch (err) {
      toast(errorMessage(err), "error");
    } finally {
      more.disabled = false;
    }
  }

  return { title: "Events", refresh };
}

const functionNamesOf = (entry) => (entry?.runs ?? []).map((run) => functionName(run.function_id)).join();

function eventRow(event, entry, flash) {
  const id = event.internal_id;
  return h("article", { class: `card event-row${flash ? " flash" : ""}`, "data-testid": "event-row", "data-event-id": id, "data-event-name": event.name ?? "" },
    h("div", { class: "event-row-head" },
      h("span", { class: "event-name mono" }, event.name ?? "(unnamed)"),
      h("span", { class: "event-ids muted small" },
        h("span", { class: "mono", title: "Event ID" }, id),
        event.id && event.id !== id ? h("span", { class: "mono", title: "The event's own id" }, `id ${event.id}`) : null),
      timeEl(event.received_at)),
    h("div", { class: "event-runs-line" }, h("span", { class: "field-label" }, "Runs"), eventRunsView(entry)),
    collapsible(`event:${id}`, "Payload", jsonView(eventPayload(event))));
}

function eventRunsView(entry) {
  if (!entry) return h("span", { class: "muted" }, "…");
  if (entry.error) return h("span", { class: "muted" }, entry.error);
  if (!entry.runs.length) return h("span", { class: "muted", "data-testid": "event-no-run" }, "no run");
  return eventRunsList(entry.runs);
}

function eventRunsList(runs) {
  return h("ul", { class: "event-runs" }, runs.map((run) => h("li", { "data-testid": "event-run", "data-run-id": run.run_id },
    h("a", { href: runHref(run.run_id), class: "event-run-link" }, statusBadge(run.status, "run-status"), functionLabel(run.function_id)),
    run.skip_reason ? h("span", { class: "note-skip" }, run.skip_reason) : null)));
}

function sendEventForm(onSent) {
  const name = h("input", {
    id: "send-event-name", "data-testid": "send-event-name", required: true, placeholder: "app/user.created",
    autocomplete: "off", spellcheck: "false",
  });
  const data = h("textarea", { id: "send-event-data", "data-testid": "send-event-data", rows: 3, spellcheck: "false", value: "{}" });
  const message = h("p", { class: "form-message", role: "status" });
  const submit = h("button", { type: "submit", class: "btn primary", "data-testid": "send-event-submit" }, "Send event");

  const fail = (text) => {
    message.className = "form-message error";
    message.textContent = text;
  };
  const send = async (event) => {
    event.preventDefault();
    const eventName = name.value.trim();
    if (!eventName) return fail("Give the event a name.");
    let payload;
    try {
      payload = data.value.trim() ? JSON.parse(data.value) : {};
    } catch (err) {
      return fail(`Data is not valid JSON: ${err.message}`);
    }
    if (!isObject(payload)) return fail("Data must be a JSON object, like {\"id\": 42}.");
    submit.disabled = true;
    message.className = "form-message";
    message.textContent = "Sending…";
    try {
      const answer = await api("/v1/events", { method: "POST", body: { name: eventName, data: payload } });
      const ids = answer?.ids ?? answer?.data?.ids ?? [];
      message.className = "form-message ok";
      message.textContent = ids.length ? `Sent: ${ids.join(", ")}` : "Sent.";
      await onSent(ids);
    } catch (err) {
      fail(errorMessage(err));
    } finally {
      submit.disabled = false;
    }
  };

  return h("form", { class: "card send-event", "data-testid": "send-event-form", "aria-labelledby": "send-event-title", novalidate: true, onsubmit: send },
    h("h2", { id: "send-event-title" }, "Send test event"),
    h("div", { class: "send-event-fields" },
      field("Name", name), field("Data (JSON object)", data)),
    h("div", { class: "form-foot" }, submit, message));
}

// ---------------------------------------------------------------- functions

function functionsView(ctx) {
  const state = { stats: new Map(), statsAt: 0, cache: new Map(), loaded: false };
  const grid = h("div", { class: "fn-grid" });
  const empty = h("p", { class: "empty", hidden: true }, "No functions yet. Sync an app to see its functions.");
  const errorSlot = h("div");
  ctx.root.append(h("div", { class: "view-head" }, h("h1", null, "Functions")), errorSlot, grid, empty);

  function render() {
    reconcile(grid, fnStore.list.map((fn) => {
      const stats = serverStats(fn.raw.recent_runs) ?? state.stats.get(fn.id);
      return keyed(state.cache, fn.id, JSON.stringify([fn.raw, stats ?? null]), () => functionCard(fn, stats));
    }));
    empty.hidden = !state.loaded || fnStore.list.length > 0;
  }

  const refresh = serial(async () => {
    try {
      await loadFunctions(POLL_MS - 100);
      if (!ctx.alive()) return;
      errorSlot.replaceChildren();
      state.loaded = true;
      render();
    } catch (err) {
      if (ctx.alive()) errorSlot.replaceChildren(alertBox(errorMessage(err)));
      return;
    }
    // `/v1/functions` counts recent runs itself; otherwise ask per function.
    const missing = fnStore.list.filter((fn) => !isObject(fn.raw.recent_runs));
    if (!missing.length || Date.now() - state.statsAt < 10_000) return;
    state.statsAt = Date.now();
    await eachLimited(missing, 4, async (fn) => {
      try {
        const runs = (await getData(`/v1/runs?function_id=${enc(fn.id)}&limit=100`)) ?? [];
        state.stats.set(fn.id, runStats(runs));
      } catch (err) {
        state.stats.set(fn.id, { error: errorMessage(err) });
      }
    });
    if (ctx.alive()) render();
  });

  return { title: "Functions", refresh };
}

/** `recent_runs` of `/v1/functions`: {counts, total, failure_rate}. */
function serverStats(recent) {
  if (!isObject(recent) || !isObject(recent.counts)) return null;
  const counts = Object.fromEntries(STATUSES.map((s) => [s, Number(recent.counts[s]) || 0]));
  const finished = counts.Completed + counts.Failed;
  const total = Number(recent.total) || Object.values(counts).reduce((a, b) => a + b, 0);
  return { total, counts, finished, failureRate: finished ? counts.Failed / finished : null, recent: [] };
}

function runStats(runs) {
  const counts = Object.fromEntries(STATUSES.map((s) => [s, 0]));
  for (const run of runs) counts[run.status] = (counts[run.status] ?? 0) + 1;
  const finished = counts.Completed + counts.Failed;
  const recent = runs.slice(0, 8).map((run) => ({ id: run.run_id, status: run.status, at: run.run_started_at }));
  return { total: runs.length, counts, finished, failureRate: finished ? counts.Failed / finished : null, recent };
}

function functionCard(fn, stats) {
  const flow = flowChips(fn);
  return h("article", { class: "card fn-card", "data-testid": "function-row", "data-function-id": fn.id },
    h("div", { class: "fn-head" },
      h("h2", null, fn.name),
      h("a", { class: "btn small", href: `#/runs?function=${enc(fn.id)}` }, "Runs")),
    h("p", { class: "muted small" },
      h("span", { class: "mono" }, fn.id),
      fn.appId ? ` · app ${fn.appId}` : "", fn.version !== null ? ` · v${fn.version}` : ""),
    h("div", { class: "chip-row", "aria-label": "Triggers" }, triggerChips(fn.triggers)),
    flow.length ? h("div", { class: "chip-row flow", "aria-label": "Flow control" }, flow) : null,
    statsView(stats));
}

function triggerChips(triggers) {
  if (!Array.isArray(triggers) || !triggers.length) return [h("span", { class: "muted small" }, "no triggers")];
  return triggers.map((trigger) => {
    const expression = trigger.expression ?? trigger.if;
    if (trigger.cron) return chip("cron", trigger.cron);
    if (trigger.event) return chip("event", expression ? `${trigger.event} if ${expression}` : trigger.event);
    return chip("trigger", JSON.stringify(trigger));
  });
}

/** Compact chips for the function's flow-control settings. */
function flowChips(fn) {
  const get = (...names) => {
    for (const source of fn.sources) {
      for (const name of names) if (source[name] !== undefined && source[name] !== null) return source[name];
    }
    return undefined;
  };
  const parts = (...items) => items.filter((item) => item !== undefined && item !== null && item !== "").join(" · ");
  const keyOf = (rule) => (rule?.key ? `key ${rule.key}` : null);
  const chips = [];
  const add = (label, value, rule) => chips.push(chip(label, value || JSON.stringify(rule), JSON.stringify(rule)));

  for (const rule of [get("concurrency")].flat().filter((r) => r !== undefined)) {
    add("concurrency", typeof rule === "number" ? String(rule) : parts(rule.limit, keyOf(rule), rule.scope && rule.scope !== "fn" ? rule.scope : null), rule);
  }
  const throttle = get("throttle");
  if (throttle) add("throttle", parts(`${throttle.limit}/${throttle.period}`, throttle.burst ? `burst ${throttle.burst}` : null, keyOf(throttle)), throttle);
  const rate = get("rateLimit", "rate_limit");
  if (rate) add("rate limit", parts(`${rate.limit}/${rate.period}`, keyOf(rate)), rate);
  const debounce = get("debounce");
  if (debounce) add("debounce", parts(debounce.period, debounce.timeout ? `max ${debounce.timeout}` : null, keyOf(debounce)), debounce);
  const batch = get("batchEvents", "batch_events");
  if (batch) add("batch", parts(`${batch.maxSize ?? batch.max_size} / ${batch.timeout}`, keyOf(batch), batch.if ? `if ${batch.if}` : null), batch);
  const priority = get("priority");
  if (priority) add("priority", priority.run ?? "", priority);
  const singleton = get("singleton");
  if (singleton) add("singleton", parts(singleton.mode, keyOf(singleton)), singleton);
  const idempotency = get("idempotency");
  if (idempotency) add("idempotency", String(idempotency), idempotency);
  for (const rule of [get("cancel")].flat().filter(Boolean)) {
    add("cancel on", parts(rule.event, rule.if ? `if ${rule.if}` : null, rule.timeout ? `within ${rule.timeout}` : null), rule);
  }
  const timeouts = get("timeouts");
  if (timeouts?.start) add("start timeout", String(timeouts.start), timeouts);
  if (timeouts?.finish) add("finish timeout", String(timeouts.finish), timeouts);
  const retries = get("steps")?.step?.retries?.attempts ?? get("retries");
  if (retries !== undefined) add("retries", String(isObject(retries) ? retries.attempts : retries), retries);
  return chips;
}

function statsView(stats) {
  if (!stats) return h("p", { class: "muted small" }, "Loading recent runs…");
  if (stats.error) return h("p", { class: "muted small" }, stats.error);
  if (!stats.total) return h("p", { class: "muted small" }, "No runs yet.");
  const bar = h("div", { class: "stat-bar", role: "img", "aria-label": STATUSES.map((s) => `${stats.counts[s]} ${s}`).join(", ") });
  const counts = [];
  for (const status of STATUSES) {
    const n = stats.counts[status];
    if (!n) continue;
    const segment = h("span", { class: `seg status-${status.toLowerCase()}`, title: `${n} ${status}` });
    segment.style.flexGrow = String(n);
    bar.append(segment);
    counts.push(h("span", { class: "count" }, statusBadge(status), ` ${n}`));
  }
  const rate = stats.failureRate === null ? "—" : `${(stats.failureRate * 100).toFixed(stats.failureRate < 0.1 && stats.failureRate > 0 ? 1 : 0)}%`;
  return h("div", { class: "fn-stats" },
    h("div", { class: "fn-stats-head" },
      h("span", { class: "small muted" }, `Last ${plural(stats.total, "run")}`),
      h("span", { class: `small failure-rate${stats.failureRate ? " bad" : ""}`, title: "Failed ÷ (Completed + Failed)" }, `failure rate ${rate}`)),
    bar,
    h("div", { class: "counts" }, counts),
    stats.recent.length === 0 ? null : h("div", { class: "recent" }, stats.recent.map((run) =>
      h("a", { href: runHref(run.id), class: `dot status-${String(run.status).toLowerCase()}`, title: `${run.status} · ${run.id}`, "aria-label": `${run.status} run ${run.id}` }))));
}

// ---------------------------------------------------------------- apps

function appsView(ctx) {
  const state = { cache: new Map(), messages: new Map(), busy: new Set(), loaded: false, apps: [] };
  const list = h("div", { class: "app-list" });
  const empty = h("p", { class: "empty", hidden: true }, "No apps yet. Start your app: under baton dev it is found on the usual ports and paths. Or start Baton with -u <app URL>, or PUT the app's serve URL.");
  const errorSlot = h("div");
  const discoverySlot = h("section", { class: "card discovery", "data-testid": "discovery", hidden: true, "aria-label": "App discovery" });
  let discoverySignature = null;
  ctx.root.append(h("div", { class: "view-head" }, h("h1", null, "Apps")), errorSlot, discoverySlot, list, empty);

  async function refreshDiscovery() {
    let discovery;
    try {
      discovery = await getData("/v1/discovery");
    } catch {
      return; // older servers: no panel
    }
    if (!ctx.alive() || !discovery) return;
    const signature = JSON.stringify(discovery);
    if (signature === discoverySignature) return;
    discoverySignature = signature;
    discoverySlot.replaceChildren(discoveryPanel(discovery));
    discoverySlot.hidden = false;
  }

  function render() {
    reconcile(list, state.apps.map((app) => {
      const message = state.messages.get(app.id);
      const busy = state.busy.has(app.id);
      const names = (app.functions ?? []).map(functionName).join();
      return keyed(state.cache, app.id, JSON.stringify([app, message ?? null, busy, names]), () => appCard(app, message, busy, resync));
    }));
    empty.hidden = !state.loaded || state.apps.length > 0;
  }

  async function resync(app) {
    state.busy.add(app.id);
    state.messages.delete(app.id);
    render();
    try {
      await api("/v1/apps/sync", { method: "POST", body: { url: app.url } });
      state.messages.set(app.id, { kind: "ok", text: "Synced." });
      fnStore.at = 0;
      toast(`Synced ${app.id}`);
    } catch (err) {
      state.messages.set(app.id, { kind: "error", text: errorMessage(err) });
    } finally {
      state.busy.delete(app.id);
    }
    await refresh();
    render();
  }

  const refresh = serial(async () => {
    loadFunctions().then(() => ctx.alive() && render()).catch(() => {});
    refreshDiscovery();
    try {
      const apps = (await getData("/v1/apps")) ?? [];
      if (!ctx.alive()) return;
      errorSlot.replaceChildren();
      state.apps = apps;
      state.loaded = true;
      render();
    } catch (err) {
      if (ctx.alive()) errorSlot.replaceChildren(alertBox(errorMessage(err)));
    }
  });

  return { title: "Apps", refresh };
}

/** What `baton dev` looks at and what it found: found, synced, failed
 *  (with the reason) or gone. */
function discoveryPanel(discovery) {
  if (!discovery.enabled) {
    return h("p", { class: "muted", "data-testid": "discovery-off" }, h("strong", null, "Discovery "),
      "App discovery is off (production, or --no-discovery). Sync apps with -u <app URL> or Resync.");
  }
  const ports = discovery.ports ?? [];
  const shown = ports.length > 8 ? `${ports.slice(0, 8).join(", ")}, … (${ports.length} ports)` : ports.join(", ");
  const every = discovery.interval_ms ? ` every ${fmtDuration(discovery.interval_ms)}` : "";
  const apps = discovery.apps ?? [];
  return h("div", null,
    h("h2", null, "Discovery"),
    h("p", { class: "muted" }, `Looking for apps on 127.0.0.1 ports ${shown}${every} (paths ${(discovery.paths ?? []).join(", ")}).`),
    apps.length === 0
      ? h("p", { class: "muted", "data-testid": "discovery-none" }, "Nothing found yet: start your app on one of these ports.")
      : h("ul", { class: "discovery-list" }, apps.map((app) =>
        h("li", { class: "discovery-item", "data-testid": "discovered-app", "data-url": app.url, "data-state": app.state },
          h("span", { class: `discovery-state discovery-state-${app.state}` }, app.state),
          h("span", { class: "mono" }, app.url),
          app.app_id ? h("span", null, "app ", h("strong", null, app.app_id), ` · ${plural(app.functions ?? 0, "function")}`) : null,
          app.synced_at ? h("span", { class: "muted" }, "synced ", timeEl(app.synced_at)) : null,
          app.error ? h("span", { class: "form-message error", role: "alert" }, app.error) : null))));
}

function appCard(app, message, busy, resync) {
  const url = safeUrl(app.url);
  const functions = app.functions ?? [];
  return h("article", { class: "card app-card", "data-testid": "app-row", "data-app-id": app.id },
    h("div", { class: "fn-head" },
      h("h2", null, app.id),
      h("button", { type: "button", class: "btn", "data-testid": "resync-app", disabled: busy, onclick: () => resync(app) }, busy ? "Syncing…" : "Resync")),
    h("p", { class: "app-url" }, url ? h("a", { href: url, class: "mono", rel: "noreferrer" }, app.url) : h("span", { class: "mono" }, app.url ?? "")),
    h("dl", { class: "app-facts" },
      [
        ["SDK", app.sdk || "—"],
        ["Framework", app.framework || "—"],
        ["Last sync", app.synced_at ? h("span", null, timeEl(app.synced_at, false), " (", timeEl(app.synced_at), ")") : "—"],
        ["Functions", String(functions.length)],
      ].map(([term, value]) => h("div", null, h("dt", null, term), h("dd", null, value)))),
    app.last_error ? h("p", { class: "form-message error", role: "alert", "data-testid": "app-sync-error" }, `Last sync failed: ${app.last_error}`) : null,
    functions.length ? collapsible(`app:${app.id}:functions`, `Functions (${functions.length})`,
      h("div", { class: "chip-row" }, functions.map((id) =>
        h("a", { class: "chip link", href: `#/runs?function=${enc(id)}`, title: `Runs of ${id}` }, functionName(id)))),
      functions.length <= 12) : null,
    message ? h("p", { class: `form-message ${message.kind}`, role: message.kind === "error" ? "alert" : "status" }, message.text) : null);
}

// ---------------------------------------------------------------- router and poller

const ROUTES = [
  [/^runs\/(.+)$/, runView, "runs"],
  [/^runs$/, runsView, "runs"],
  [/^events$/, eventsView, "events"],
  [/^functions$/, functionsView, "functions"],
  [/^apps$/, appsView, "apps"],
];

let current = null;
let generation = 0;

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "");
  const at = raw.indexOf("?");
  const path = (at < 0 ? raw : raw.slice(0, at)).replace(/\/+$/, "");
  return { path, query: new URLSearchParams(at < 0 ? "" : raw.slice(at + 1)) };
}

function decode(text) {
  try {
    return decodeURIComponent(text);
  } catch {
    return text;
  }
}

function route() {
  const { path, query } = parseHash();
  if (!path) {
    history.replaceState(null, "", "#/runs");
    return route();
  }
  generation += 1;
  const mine = generation;
  const root = document.getElementById("main");
  root.replaceChildren();
  let view = notFoundView;
  let params = [];
  let nav = null;
  for (const [pattern, candidate, key] of ROUTES) {
    const match = pattern.exec(path);
    if (match) {
      [view, params, nav] = [candidate, match.slice(1).map(decode), key];
      break;
    }
  }
  highlightNav(nav);
  current = view({ root, params, query, alive: () => mine === generation });
  document.title = `${current.title} · Baton`;
  current.refresh?.();
}

function notFoundView(ctx) {
  ctx.root.append(h("h1", null, "Not found"), h("p", null, "No such page. ", h("a", { href: "#/runs" }, "Go to runs")));
  return { title: "Not found" };
}

function poll() {
  if (live.paused || document.hidden || !current?.refresh || current.refresh.busy()) return;
  current.refresh();
}

async function start() {
  renderLive();
  document.getElementById("live").addEventListener("click", () => {
    live.paused = !live.paused;
    renderLive();
    if (!live.paused) poll();
  });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) poll();
  });
  window.addEventListener("hashchange", route);
  await loadSession();
  setupSignOut();
  route();
  loadServerInfo();
  setInterval(poll, POLL_MS);
  setInterval(tickTimes, 1000);
  setInterval(() => document.hidden || loadServerInfo(), 60_000);
}

start();
