// The operator's page: thumbnails of the consoles with a live session and the last lines of
// the followed serial consoles, live sessions (Kill),
// tokens by instance (Revoke), the store's state.
// Plain JS, no build step. The API key lives in this tab's sessionStorage only; every call
// sends it as a Bearer token to this gateway's /api/v1/. Text goes in with textContent only.
"use strict";

const KEY_NAME = "vncgate-api-key";
const API = new URL("../api/v1/", window.location.href);
const REFRESH_MS = 2000;
// Thumbnails: each console's at most every THUMB_MS while the page is visible, one request at a
// time per console and at most THUMB_PARALLEL on the page, started at most every THUMB_TICK_MS
// (so 4 a second: the page stays well inside the API key's rate, api_rate, with 500 consoles).
const THUMB_MS = 3000;
const THUMB_TICK_MS = 250;
const THUMB_PARALLEL = 2;
const THUMB_WIDTH = 320; // ?max_width= of the screenshots (the gateway scales by a whole factor)
const LOG_LINES = 12; // a followed serial console's tile: its log's last lines
let thumbsInFlight = 0;
let timer = null;
let thumbTimer = null;
const tiles = new Map(); // token id, or "serial:" + instance -> { figure, picture, caption, busy, url, ... }

function $(id) { return document.getElementById(id); }

function say(text) { $("status").textContent = text || ""; }

async function call(method, path) {
  const key = window.sessionStorage.getItem(KEY_NAME);
  const response = await fetch(new URL(path, API), {
    method, headers: { "Authorization": "Bearer " + key }, cache: "no-store", credentials: "omit",
  });
  const body = await response.json().catch(() => ({ error: response.statusText }));
  if (response.status === 401) {
    signOut(body.error);
    throw new Error(body.error);
  }
  if (!response.ok) throw new Error(body.error || String(response.status));
  return body;
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function button(row, label, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = "danger";
  b.textContent = label;
  b.addEventListener("click", onClick);
  row.insertCell().appendChild(b);
  return b;
}

function duration(seconds) {
  const s = Math.floor(seconds);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
  return (h ? h + "h " : "") + (h || m ? m + "m " : "") + (s % 60) + "s";
}

function emptyRow(body, columns, text) {
  const row = body.insertRow();
  row.className = "empty";
  const td = cell(row, text);
  td.colSpan = columns;
}

function showSessions(sessions) {
  const body = $("sessions").tBodies[0];
  body.replaceChildren();
  for (const s of sessions) {
    const row = body.insertRow();
    row.dataset.sessionId = s.session_id;
    cell(row, s.instance_id, "instance");
    cell(row, s.client, "client");
    cell(row, s.path);
    cell(row, s.gateway_id);
    cell(row, duration(s.duration));
    cell(row, s.bytes_up.toLocaleString(), "number");
    cell(row, s.bytes_down.toLocaleString(), "number");
    const kill = button(row, s.kill_requested ? "Ending…" : "Kill", () => act(kill,
      "DELETE", "sessions/" + encodeURIComponent(s.session_id)));
    kill.disabled = s.kill_requested;
  }
  if (!sessions.length) emptyRow(body, 8, "No live sessions.");
}

function showTokens(tokens) {
  const body = $("tokens").tBodies[0];
  body.replaceChildren();
  const byInstance = new Map();
  for (const t of tokens) {
    if (!byInstance.has(t.instance_id)) byInstance.set(t.instance_id, []);
    byInstance.get(t.instance_id).push(t);
  }
  for (const [instance, rows] of [...byInstance].sort((a, b) => a[0].localeCompare(b[0]))) {
    const head = body.insertRow();
    head.className = "instance";
    head.dataset.instance = instance;
    const name = cell(head, instance);
    name.colSpan = 6;
    const revokeAll = button(head, "Revoke all", () => act(revokeAll,
      "DELETE", "consoles?instance=" + encodeURIComponent(instance)));
    for (const t of rows) {
      const row = body.insertRow();
      row.dataset.tokenId = t.token_id;
      cell(row, "");
      cell(row, t.token_id);
      cell(row, t.console_type);
      cell(row, t.host + ":" + t.port);
      cell(row, t.state);
      cell(row, t.expires_at.replace("T", " ").replace("Z", ""));
      const revoke = button(row, "Revoke", () => act(revoke,
        "DELETE", "consoles/" + encodeURIComponent(t.token_id)));
    }
  }
  if (!tokens.length) emptyRow(body, 7, "No tokens.");
}

// -- consoles at a glance ------------------------------------------------------------------

// VNC consoles with a live session (by token id: a screenshot) and followed serial consoles
// (by instance: their log's last lines).
function showGlance(sessions, follows) {
  const wanted = new Map();
  for (const s of sessions) {
    if (s.path !== "serial" && !wanted.has(s.token_id)) wanted.set(s.token_id, { instance: s.instance_id });
  }
  for (const f of follows) wanted.set("serial:" + f.instance_id, { instance: f.instance_id, serial: true });
  const grid = $("glance");
  for (const [id, tile] of tiles) {
    if (wanted.has(id)) continue;
    if (tile.url) URL.revokeObjectURL(tile.url);
    tile.figure.remove();
    tiles.delete(id);
  }
  for (const [id, { instance, serial }] of wanted) {
    if (tiles.has(id)) continue;
    const figure = document.createElement("figure");
    figure.dataset[serial ? "instance" : "tokenId"] = serial ? instance : id;
    const picture = document.createElement(serial ? "pre" : "img");
    if (!serial) picture.alt = "screen of " + instance;
    const caption = document.createElement("figcaption");
    caption.textContent = instance;
    figure.append(picture, caption);
    figure.addEventListener("click", () => openEntry(serial ? null : id, instance));
    grid.appendChild(figure);
    tiles.set(id, { figure, picture, caption, instance, serial, busy: false, url: null, fetched: 0 });
  }
  grid.querySelector(".empty").hidden = tiles.size > 0;
}

async function fetchOk(path, key) {
  const response = await fetch(new URL(path, API), {
    headers: { "Authorization": "Bearer " + key }, cache: "no-store", credentials: "omit" });
  if (!response.ok) {
    const body = await response.json().catch(() => ({ error: response.statusText }));
    throw new Error(body.error || String(response.status));
  }
  return response;
}

async function thumbnail(id, tile, key) {
  tile.busy = true;
  thumbsInFlight += 1;
  try {
    if (tile.serial) {
      const log = await (await fetchOk("consoles/log?tail=" + LOG_LINES + "&instance=" +
        encodeURIComponent(tile.instance), key)).json();
      // A terminal's control sequences (colours, clearing) are not text: dropped, not drawn.
      tile.picture.textContent = log.output.replace(/\x1b(\[[0-9;?]*[ -\/]*[@-~]|[@-_c])/g, "");
    } else {
      const response = await fetchOk("consoles/" + encodeURIComponent(id) + "/screenshot?max_width=" + THUMB_WIDTH,
        key);
      const url = URL.createObjectURL(await response.blob());
      if (tile.url) URL.revokeObjectURL(tile.url);
      tile.url = url;
      tile.picture.src = url;
    }
    tile.figure.classList.remove("failed");
    tile.caption.textContent = tile.instance;
    tile.figure.title = "updated " + new Date().toLocaleTimeString();
  } catch (error) {
    tile.figure.classList.add("failed");
    tile.caption.textContent = tile.instance + ": " + error.message;
  } finally {
    tile.busy = false;
    tile.fetched = Date.now();
    thumbsInFlight -= 1;
  }
}

// One tick: the console whose picture is oldest, if it is due; none while the page is hidden.
function nextThumbnail() {
  const key = window.sessionStorage.getItem(KEY_NAME);
  if (!key || document.visibilityState !== "visible" || thumbsInFlight >= THUMB_PARALLEL) return;
  let due = null;
  for (const entry of tiles) {
    const tile = entry[1];
    if (!tile.busy && Date.now() - tile.fetched >= THUMB_MS && (!due || tile.fetched < due[1].fetched)) due = entry;
  }
  if (due) thumbnail(due[0], due[1], key);
}

// The console's entry in "Tokens by instance": its token's row, or its instance's.
function openEntry(tokenId, instance) {
  const row = $("tokens").querySelector(tokenId ? 'tr[data-token-id="' + CSS.escape(tokenId) + '"]'
    : 'tr.instance[data-instance="' + CSS.escape(instance) + '"]');
  if (!row) return;
  for (const old of document.querySelectorAll("tr.highlight")) old.classList.remove("highlight");
  row.classList.add("highlight");
  row.scrollIntoView({ block: "center" });
}

function showStore(state) {
  const badge = $("store");
  badge.textContent = state.up
    ? "store: up · " + Object.entries(state.tokens).map(([k, v]) => v + " " + k).join(", ")
    : "store: unavailable";
  badge.className = "store " + (state.up ? "up" : "down");
}

async function act(control, method, path) {
  control.disabled = true;
  try {
    await call(method, path);
    say("");
  } catch (error) {
    say(error.message);
  }
  await refresh();
}

async function refresh() {
  if (!window.sessionStorage.getItem(KEY_NAME)) return;
  try {
    const [sessions, tokens, state, follows] = await Promise.all([call("GET", "sessions"), call("GET", "consoles"),
      call("GET", "store"), call("GET", "consoles/follows")]);
    showSessions(sessions);
    showGlance(sessions, follows);
    showTokens(tokens);
    showStore(state);
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (error) {
    say(error.message);
  }
}

function signedIn() {
  $("signin").hidden = true;
  $("board").hidden = false;
  $("signout").hidden = false;
  refresh();
  timer = window.setInterval(refresh, REFRESH_MS);
  thumbTimer = window.setInterval(nextThumbnail, THUMB_TICK_MS);
}

function signOut(message) {
  window.sessionStorage.removeItem(KEY_NAME);
  window.clearInterval(timer);
  window.clearInterval(thumbTimer);
  showGlance([], []);
  $("board").hidden = true;
  $("signout").hidden = true;
  $("signin").hidden = false;
  say(message || "");
}

document.addEventListener("DOMContentLoaded", () => {
  $("signin").addEventListener("submit", (event) => {
    event.preventDefault();
    window.sessionStorage.setItem(KEY_NAME, $("key").value.trim());
    $("key").value = "";
    say("");
    signedIn();
  });
  $("signout").addEventListener("click", () => signOut(""));
  if (window.sessionStorage.getItem(KEY_NAME)) signedIn();
});
