// The demo page: a client of the wire protocol (docs/protocol.md). Plain JavaScript, no build step.
// Model text is only ever put on the page as text (textContent, Text nodes), never parsed as HTML.
"use strict";

const SESSION_ID_RE = /^[A-Za-z0-9._:-]{1,128}$/;
const MAX_MESSAGE_BYTES = 16 * 1024;
const OFFLINE_MODEL = "offline-demo";
// Closes after which the page reconnects by itself: the server went away or broke, not the user or the session.
// 4000 (another tab took the session over) and 4001 (idle) are final: reconnecting would fight the other tab.
const RETRY_CODES = new Set([1001, 1005, 1006, 1011, 1012, 1013, 1014]);
const RETRY = { baseMs: 500, capMs: 15000, maxAttempts: 10 };
const SUMMARY_POLL = { firstMs: 400, capMs: 5000, forMs: 120000 };
// A socket that answers nothing (not even our pings) for this long is treated as dropped.
const PING_EVERY_MS = 25000;
const SILENT_FOR_MS = 40000;
// What a stored answer's status looks like in the conversation; `completed` needs no word.
const STATUS_LABELS = {
  cancelled: "stopped",
  failed: "failed: the model did not answer",
  interrupted: "interrupted: the server stopped before the answer ended",
};
// Per tab (a reload keeps it, another tab does not share it): whether this tab was connected, to which session,
// and the answer it was streaming, so that a reload reconnects by itself and goes on from where it was.
const SAVED_KEY = "realtime-ai-page";
const CLOSE_REASONS = {
  1001: "the server is restarting",
  1005: "no close code",
  1006: "the connection dropped",
  1008: "not allowed",
  1009: "a message was too big",
  1011: "a server error",
  4000: "another tab took the session over",
  4001: "idle for too long",
};

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("status"),
  statusText: $("status-text"),
  sessionForm: $("session-form"),
  sessionId: $("session-id"),
  sessionHint: $("session-hint"),
  newId: $("new-id"),
  connect: $("connect"),
  disconnect: $("disconnect"),
  log: $("log"),
  announcer: $("announcer"),
  summary: $("summary"),
  summaryText: $("summary-text"),
  messageForm: $("message-form"),
  message: $("message"),
  send: $("send"),
  stop: $("stop"),
  refresh: $("refresh"),
  recentNote: $("recent-note"),
  sessions: $("sessions"),
  viewer: $("viewer"),
  viewerTitle: $("viewer-title"),
  viewerMeta: $("viewer-meta"),
  viewerSummary: $("viewer-summary"),
  viewerLog: $("viewer-log"),
  viewerResume: $("viewer-resume"),
  viewerClose: $("viewer-close"),
};

const state = {
  sessionId: "", // the session the log shows
  ws: null, // the current socket; events from older ones are ignored
  ready: false, // session.ready arrived on the current socket
  wanted: false, // from Connect until Disconnect or a final close: a drop then means "reconnect"
  attempt: 0, // reconnect attempts since the last session.ready
  retryTimer: 0,
  pingTimer: 0,
  lastFrameAt: 0,
  model: "",
  resumed: false,
  cursor: 0, // the largest stored id seen: the `after=` of a reconnect
  shown: new Set(), // stored ids in the log: what makes a message appear once, whatever is replayed
  outbox: new Map(), // client_msg_id -> {frame, el}: sent or queued, not yet stored
  answers: new Map(), // response_id -> {el, label, seq}: answers not yet stored; seq: the last delta's `seq` held
  streaming: null, // the response_id being streamed now (still set while a dropped socket reconnects)
  resumeAsked: null, // {response_id, seq}: the `resume=` of the current socket
  restore: null, // {response_id, seq, text}: the answer a reload interrupted, shown again once the server confirms it
  visit: null, // {previousSummary: Promise, changed, connected}: this Connect's story, for notes and the summary
  summaryPoll: 0, // bumped to stop a running poll
  sessionsLoad: 0, // bumped so that only the latest list is drawn
  sessionsTimer: 0, // a list refresh due soon (after an answer is stored)
  pastLoad: 0, // bumped so that a stored conversation shown before Connect never lands after it
  speech: "", // streamed text not yet read out
};

// Small helpers.

function randomHex(bytes) {
  // crypto.getRandomValues works on plain http too (randomUUID needs a secure context).
  const values = crypto.getRandomValues(new Uint8Array(bytes));
  return Array.from(values, (b) => b.toString(16).padStart(2, "0")).join("");
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function formatTime(iso) {
  const date = iso ? new Date(iso) : new Date();
  return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function formatDate(iso) {
  return iso ? new Date(iso).toLocaleString([], { dateStyle: "medium", timeStyle: "short" }) : "";
}

function describeClose(code) {
  return CLOSE_REASONS[code] ? `${CLOSE_REASONS[code]}, ${code}` : `code ${code}`;
}

// When the server checks access tokens, open the page as /?access_token=<JWT> (for example from your
// sign-in flow): the token goes with every request, as a header to /api and in the query of the
// WebSocket (browsers cannot set headers on a WebSocket).
const ACCESS_TOKEN = new URLSearchParams(location.search).get("access_token");

async function getJson(url) {
  const headers = { Accept: "application/json" };
  if (ACCESS_TOKEN) headers.Authorization = `Bearer ${ACCESS_TOKEN}`;
  const resp = await fetch(url, { headers, cache: "no-store" });
  const body = await resp.json().catch(() => null);
  if (!resp.ok) {
    const error = new Error(body?.error?.message ?? `HTTP ${resp.status}`);
    error.status = resp.status;
    throw error;
  }
  return body;
}

// The status line.

function modelNote() {
  if (state.model === OFFLINE_MODEL) return " · the offline demo model answers (no OPENAI_API_KEY set)";
  return state.model ? ` · model ${state.model}` : "";
}

function setStatus(kind, text) {
  ui.status.dataset.state = kind;
  ui.statusText.textContent = text;
}

function showConnected() {
  if (state.streaming) setStatus("answering", `Answering…${modelNote()}`);
  else setStatus("connected", `Connected${state.resumed ? " · session resumed" : ""}${modelNote()}`);
}

function updateControls() {
  const focused = document.activeElement;
  ui.connect.disabled = state.wanted;
  ui.newId.disabled = state.wanted;
  ui.disconnect.disabled = !state.wanted;
  // Read-only rather than disabled: it stays focusable and readable by a screen reader.
  ui.sessionId.readOnly = state.wanted;
  ui.message.disabled = !state.wanted;
  ui.send.disabled = !state.wanted;
  ui.stop.hidden = !(state.streaming && state.ready);
  ui.log.classList.toggle("live", state.wanted);
  // Never strand keyboard focus on a control that just vanished or was disabled (Stop, Disconnect, Send…).
  if (focused && focused !== document.body && (focused.disabled || focused.hidden)) {
    (state.wanted ? ui.message : ui.connect).focus();
  }
}

// The conversation log.

function nearBottom(el) {
  return el.scrollHeight - el.scrollTop - el.clientHeight < 48;
}

// Follow new text only when the reader is already at the bottom: never yank them back while they scroll up.
function appendToLog(el, list = ui.log) {
  const follow = nearBottom(list);
  list.append(el);
  if (follow) list.scrollTop = list.scrollHeight;
  return el;
}

function messageItem(role, text) {
  const li = document.createElement("li");
  li.className = `msg ${role}`;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Assistant";
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  const meta = document.createElement("span");
  meta.className = "meta";
  li.append(who, body, meta);
  return li;
}

function textOf(li) {
  return li.querySelector(".text");
}

function setMeta(li, text) {
  li.querySelector(".meta").textContent = text;
}

function addNote(text, kind = "info") {
  const li = document.createElement("li");
  li.className = `note ${kind}`;
  li.textContent = text;
  if (kind === "error") announce(text);
  return appendToLog(li);
}

function noteCursor(id) {
  if (id > state.cursor) state.cursor = id;
}

// A stored id is shown once: when `li` repeats one already in the log (history replayed after a reconnect
// raced our own copy), the copy goes. Returns whether `li` stays.
function markStored(li, id, label = "", at = "") {
  noteCursor(id);
  if (state.shown.has(id)) {
    li.remove();
    return false;
  }
  state.shown.add(id);
  li.dataset.id = String(id);
  li.classList.remove("pending");
  setMeta(li, [label, formatTime(at), `saved #${id}`].filter(Boolean).join(" · "));
  return true;
}

// A stored answer that did not complete says so: a class for the look, a word in its meta line.
function markStatus(li, status) {
  if (!STATUS_LABELS[status]) return "";
  li.classList.add(status);
  return STATUS_LABELS[status];
}

function showStored(item) {
  if (state.shown.has(item.id)) return;
  const li = appendToLog(messageItem(item.role, item.text));
  markStored(li, item.id, markStatus(li, item.status), item.created_at);
}

function renderHistory(items) {
  for (const item of items) showStored(item);
}

// Screen readers get the streamed answer a sentence at a time, through the live region.

function announce(text) {
  const p = document.createElement("p");
  p.textContent = text;
  ui.announcer.append(p);
  while (ui.announcer.childElementCount > 4) ui.announcer.firstElementChild.remove();
}

function speakDelta(delta) {
  state.speech += delta;
  // Chinese and Japanese sentences end with 。！？ and no space after them.
  const sentence = state.speech.match(/^[\s\S]*(?:[.!?…\n](?:\s|$)|[。！？])/);
  if (sentence) {
    announce(sentence[0]);
    state.speech = state.speech.slice(sentence[0].length);
  }
}

function speakRest(prefix = "") {
  const rest = state.speech.trim();
  state.speech = "";
  if (prefix || rest) announce(`${prefix}${rest}`);
}

// Server events.

const handlers = {
  "session.ready": onReady,
  "response.started": onStarted,
  "response.delta": onDelta,
  "response.done": onDone,
  "message.stored": onStored,
  "context.compacted": onCompacted,
  error: onError,
  pong: () => {},
};

function onFrame(data) {
  state.lastFrameAt = Date.now();
  let event;
  try {
    event = JSON.parse(data);
  } catch {
    return; // Not ours to guess at: the protocol only sends JSON objects.
  }
  const handler = handlers[event.type];
  if (handler) handler(event);
}

function onReady(event) {
  const first = !state.visit.connected;
  const retried = state.attempt === 0 ? "" : first ? "Connected." : "Reconnected.";
  state.visit.connected = true;
  state.ready = true;
  state.attempt = 0;
  state.model = event.model;
  if (first) {
    // Later readies of this visit always say "resumed": the first one tells whether the session was new.
    state.resumed = event.resumed;
    state.visit.previousSummary = previousSummary(event.resumed);
  }
  // Answers never confirmed as stored are in this history (or their message.stored follows), except the one
  // still running: that one stays, and goes on after what it holds (the `resume=` of this socket).
  const active = event.active_response?.response_id ?? null;
  for (const [responseId, answer] of state.answers) {
    if (responseId === active) continue;
    answer.el.remove();
    state.answers.delete(responseId);
  }
  if (state.restore && state.restore.response_id === active && !state.answers.has(active)) {
    state.answers.set(active, { el: messageItem("assistant", state.restore.text), label: "", seq: state.restore.seq });
  }
  state.restore = null;
  state.streaming = state.answers.has(active) ? active : null;
  renderHistory(event.history);
  // The running answer is stored when it ends: after everything in the history.
  if (state.streaming) appendToLog(state.answers.get(state.streaming).el);
  // Messages not confirmed as stored go again under their client_msg_id: the server stores and answers each
  // once, and only acknowledges one it already has.
  for (const entry of state.outbox.values()) {
    appendToLog(entry.el);
    setMeta(entry.el, "sending…");
    state.ws.send(entry.frame);
  }
  if (retried) addNote(retried);
  showConnected();
  updateControls();
  // The session open here is in Recent sessions from now on (a new one did not exist when the list was loaded).
  if (first) loadSessions();
}

function onStarted(event) {
  let answer = state.answers.get(event.response_id);
  if (!answer) {
    answer = { el: appendToLog(messageItem("assistant", "")), label: "", seq: 0 };
    state.answers.set(event.response_id, answer);
    state.speech = "";
  } else if (!(event.resumed && state.resumeAsked?.response_id === event.response_id)) {
    // Joined without saying what we hold: the catch-up is the whole text so far, so it replaces ours.
    textOf(answer.el).textContent = "";
    answer.seq = 0;
    state.speech = "";
  }
  answer.el.classList.add("pending", "streaming");
  setMeta(answer.el, "answering…");
  state.streaming = event.response_id;
  showConnected();
  updateControls();
}

function onDelta(event) {
  const answer = state.answers.get(event.response_id);
  if (!answer) return;
  if (typeof event.seq === "number") {
    // Already held (sent again by a catch-up): dropped, so no text ever shows twice.
    if (event.seq <= answer.seq) return;
    answer.seq = event.seq;
  }
  const follow = nearBottom(ui.log);
  textOf(answer.el).append(event.delta); // a Text node: the model's text is never HTML
  if (follow) ui.log.scrollTop = ui.log.scrollHeight;
  speakDelta(event.delta);
}

function onDone(event) {
  const answer = state.answers.get(event.response_id);
  if (!answer) return;
  const li = answer.el;
  textOf(li).textContent = event.text; // the whole text is authoritative, e.g. the fallback of a failed answer
  li.classList.remove("streaming");
  li.classList.add(event.status);
  if (event.status === "failed") {
    answer.label = `failed: ${event.error?.message || "the model did not answer"} (${event.error?.code})`;
    state.speech = "";
    announce(`The answer failed. ${event.text}`);
  } else if (event.status === "cancelled") {
    answer.label = "stopped";
    speakRest();
    announce("Answer stopped.");
  } else if (event.status === "interrupted") {
    answer.label = "interrupted: the server stopped before the answer ended";
    speakRest();
    announce("The answer was interrupted.");
  } else {
    speakRest();
  }
  setMeta(li, answer.label || "answered");
  if (state.streaming === event.response_id) state.streaming = null;
  showConnected();
  updateControls();
}

function onStored(event) {
  state.visit.changed = true;
  const pending = event.role === "user" ? state.outbox : state.answers;
  const key = event.role === "user" ? event.client_msg_id : event.response_id;
  const entry = pending.get(key);
  if (event.role === "assistant") refreshSessionsSoon(); // its message count in Recent sessions
  if (entry) {
    pending.delete(key);
    markStored(entry.el, event.id, entry.label || markStatus(entry.el, event.status));
  } else if (typeof event.text === "string") {
    // Stored while we were away (an answer that ended between two sockets): shown from what the event says.
    showStored({ ...event, created_at: "" });
  } else {
    noteCursor(event.id);
  }
}

function onCompacted(event) {
  // Nothing is forgotten: the model's context now starts from a summary of the older messages.
  addNote(
    `The conversation up to message #${event.through} is now summarised for the model ` +
      `(${event.tokens_before} → ${event.tokens_after} tokens of context).`,
  );
}

function onError(event) {
  addNote(`${event.message} (${event.code})`, "error");
  // The protocol's `error` does not say which frame it refuses. Refusals of a message come at once, before
  // any later frame is read, so the most recent unconfirmed message is the one refused.
  if (["rate_limited", "busy", "budget_exceeded", "message_too_long"].includes(event.code)) {
    const last = Array.from(state.outbox.entries()).pop();
    if (!last) return;
    const [clientMsgId, entry] = last;
    state.outbox.delete(clientMsgId);
    entry.el.classList.add("failed");
    setMeta(entry.el, `not sent: ${event.code}`);
  }
}

// The connection.

function socketUrl() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const query = new URLSearchParams();
  if (state.cursor > 0) query.set("after", String(state.cursor));
  // In the middle of an answer: the server's catch-up then starts after the last piece we hold.
  const open = state.answers.get(state.streaming);
  state.resumeAsked = open ? { response_id: state.streaming, seq: open.seq } : state.restore;
  if (state.resumeAsked) query.set("resume", `${state.resumeAsked.response_id}:${state.resumeAsked.seq}`);
  if (ACCESS_TOKEN) query.set("access_token", ACCESS_TOKEN);
  const search = query.toString() ? `?${query}` : "";
  return `${proto}//${location.host}/ws/session/${encodeURIComponent(state.sessionId)}${search}`;
}

function openSocket() {
  state.retryTimer = 0;
  const ws = new WebSocket(socketUrl());
  state.ws = ws;
  state.ready = false;
  state.lastFrameAt = Date.now();
  // A replaced socket's late events must not touch the page: each handler checks it is still the current one.
  ws.onmessage = (e) => ws === state.ws && onFrame(e.data);
  ws.onclose = (e) => ws === state.ws && onClosed(e.code);
  // `error` is always followed by `close`, which decides what happens next.
  startPings(ws);
}

function startPings(ws) {
  clearInterval(state.pingTimer);
  state.pingTimer = setInterval(() => {
    if (ws !== state.ws || ws.readyState !== WebSocket.OPEN) return;
    // A half-open connection (a laptop waking up, a NAT forgetting us) never fires `close` by itself.
    if (Date.now() - state.lastFrameAt > SILENT_FOR_MS) {
      state.ws = null;
      ws.close();
      onClosed(1006);
      return;
    }
    ws.send(JSON.stringify({ type: "ping" }));
  }, PING_EVERY_MS);
}

function onClosed(code) {
  state.ws = null;
  state.ready = false;
  clearInterval(state.pingTimer);
  if (!state.wanted) {
    finishDisconnect();
  } else if (code === 4000) {
    stopFollowing("goes on in the other tab");
    giveUp("Disconnected: the session is open in another tab", "This session was opened in another tab or window, " +
      "which took it over. Press Connect here to take it back.");
  } else if (!RETRY_CODES.has(code)) {
    stopFollowing("the connection closed before the end");
    giveUp("Disconnected", `The connection closed (${describeClose(code)}). Press Connect to continue.`);
  } else if (state.attempt >= RETRY.maxAttempts) {
    stopFollowing("the connection closed before the end");
    giveUp("Disconnected: could not reconnect", "Could not reconnect. Press Connect to try again.");
  } else {
    // The answer goes on at the server: the next socket picks it up where this one left it.
    const answer = state.answers.get(state.streaming);
    if (answer) setMeta(answer.el, "reconnecting…");
    scheduleRetry(code);
  }
  saveVisit();
}

// This page no longer follows the answer it was streaming (the answer itself may well go on at the server).
function stopFollowing(why) {
  const answer = state.answers.get(state.streaming);
  state.streaming = null;
  if (!answer) return;
  answer.el.classList.remove("streaming");
  setMeta(answer.el, why);
}

// Exponential backoff with "equal jitter": never sooner than half the step, so a restarted server is not
// hammered by every page at the same instant.
function backoffMs(attempt) {
  const step = Math.min(RETRY.capMs, RETRY.baseMs * 2 ** attempt);
  return step / 2 + Math.random() * (step / 2);
}

function scheduleRetry(code) {
  const delay = backoffMs(state.attempt);
  state.attempt += 1;
  if (state.attempt === 1) {
    const what = state.visit.connected ? "Connection lost" : "Could not connect";
    addNote(`${what} (${describeClose(code)}). Retrying…`);
  }
  const seconds = (delay / 1000).toFixed(1);
  setStatus("reconnecting", `Reconnecting in ${seconds} s (attempt ${state.attempt} of ${RETRY.maxAttempts})…`);
  state.retryTimer = setTimeout(() => {
    setStatus("reconnecting", `Reconnecting (attempt ${state.attempt} of ${RETRY.maxAttempts})…`);
    openSocket();
  }, delay);
  updateControls();
}

function giveUp(status, note) {
  state.wanted = false;
  dropOutbox();
  setStatus("closed", status);
  addNote(note, "error");
  updateControls();
}

// Messages never confirmed as stored: maybe stored, maybe not. Resuming the session shows which.
function dropOutbox() {
  for (const entry of state.outbox.values()) {
    entry.el.classList.add("failed");
    setMeta(entry.el, "not confirmed as saved");
  }
  state.outbox.clear();
}

function connect({ restore = null } = {}) {
  const id = ui.sessionId.value.trim();
  if (!SESSION_ID_RE.test(id)) {
    ui.sessionId.setAttribute("aria-invalid", "true");
    ui.sessionHint.textContent = "A session id is 1 to 128 letters, digits or . _ : - (no spaces).";
    ui.sessionId.focus();
    return;
  }
  ui.sessionId.removeAttribute("aria-invalid");
  ui.sessionHint.textContent = "A fresh id starts a new conversation; type an old one to resume it.";
  resetConversation(id);
  state.restore = restore;
  state.wanted = true;
  saveVisit();
  // The id goes in the address: a reload (or a bookmark) comes back to this conversation.
  history.replaceState(null, "", `#${encodeURIComponent(id)}`);
  setStatus("connecting", "Connecting…");
  openSocket();
  updateControls();
  highlightCurrentSession();
  ui.message.focus();
}

function resetConversation(id) {
  state.summaryPoll += 1;
  state.pastLoad += 1;
  ui.summary.hidden = true;
  ui.log.replaceChildren();
  Object.assign(state, {
    sessionId: id,
    cursor: 0,
    attempt: 0,
    model: "",
    resumed: false,
    streaming: null,
    resumeAsked: null,
    restore: null,
    visit: { previousSummary: null, changed: false, connected: false },
  });
  state.shown.clear();
  state.outbox.clear();
  state.answers.clear();
}

function disconnect() {
  state.wanted = false;
  clearTimeout(state.retryTimer);
  if (state.ws) {
    setStatus("connecting", "Disconnecting…");
    state.ws.close(1000, "bye"); // `close` then finishes the disconnect
  } else {
    finishDisconnect();
  }
}

function finishDisconnect() {
  stopFollowing("disconnected before the end: the server finishes it, and it will be in this session");
  dropOutbox();
  saveVisit();
  setStatus("idle", "Disconnected");
  updateControls();
  if (state.visit && (state.shown.size > 0 || state.visit.changed)) pollSummary(state.sessionId, state.visit);
  loadSessions();
}

// The summary the worker writes after a disconnect.

// What the summary was before this visit, so that an older one is not taken for the new one.
async function previousSummary(resumed) {
  if (!resumed) return null;
  try {
    return (await getJson(`/api/sessions/${encodeURIComponent(state.sessionId)}`)).summary;
  } catch {
    return null;
  }
}

function showSummary(kind, text) {
  ui.summary.hidden = false;
  ui.summary.dataset.state = kind;
  ui.summaryText.textContent = text;
}

async function pollSummary(sessionId, visit) {
  const poll = ++state.summaryPoll;
  const previous = await visit.previousSummary;
  const deadline = Date.now() + SUMMARY_POLL.forMs;
  showSummary("waiting", "Waiting for the worker to write the summary…");
  let latest = null;
  for (let delay = SUMMARY_POLL.firstMs; Date.now() < deadline; delay = Math.min(delay * 1.5, SUMMARY_POLL.capMs)) {
    await sleep(delay);
    if (poll !== state.summaryPoll) return;
    const session = await getJson(`/api/sessions/${encodeURIComponent(sessionId)}`).catch(() => null);
    if (poll !== state.summaryPoll) return;
    latest = session?.summary || latest;
    // A visit that stored nothing new gets no new summary: the one there is already covers it.
    if (session?.summary && (!visit.changed || session.summary !== previous)) {
      showSummary("done", session.summary);
      loadSessions();
      return;
    }
  }
  // The API does not say which messages a summary covers: an unchanged one may still be the new one.
  if (latest) showSummary("late", `${latest}\n\n(This may not cover your last visit yet.)`);
  else showSummary("late", "No summary yet: the worker may be busy or stopped. It will appear under Recent sessions.");
}

// Recent sessions, and one past session in a dialog.

async function loadSessions() {
  clearTimeout(state.sessionsTimer);
  const load = ++state.sessionsLoad;
  try {
    const { sessions } = await getJson("/api/sessions?limit=20");
    // The session open here is listed first when it is older than the 20 newest (an old one resumed).
    const open = state.wanted ? state.sessionId : "";
    if (open && !sessions.some((s) => s.session_id === open)) {
      const current = await getJson(`/api/sessions/${encodeURIComponent(open)}`).catch(() => null);
      if (current) sessions.unshift(current);
    }
    if (load !== state.sessionsLoad) return;
    ui.sessions.replaceChildren(...sessions.map(sessionItem));
    ui.recentNote.textContent = sessions.length ? "" : "No sessions yet.";
    highlightCurrentSession();
  } catch (e) {
    if (load === state.sessionsLoad) ui.recentNote.textContent = `Could not load the sessions: ${e.message}`;
  }
}

// One refresh for a burst of stored answers.
function refreshSessionsSoon() {
  clearTimeout(state.sessionsTimer);
  state.sessionsTimer = setTimeout(loadSessions, 500);
}

function sessionItem(session) {
  const li = document.createElement("li");
  li.dataset.sessionId = session.session_id;
  const open = document.createElement("button");
  open.type = "button";
  open.className = "link";
  open.textContent = session.session_id;
  open.setAttribute("aria-label", `Open session ${session.session_id}`);
  open.addEventListener("click", () => openViewer(session.session_id));
  const here = document.createElement("span");
  here.className = "here"; // "open here" on the session this tab is connected to
  const meta = document.createElement("p");
  meta.className = "meta";
  const count = `${session.message_count} message${session.message_count === 1 ? "" : "s"}`;
  meta.textContent = [count, formatDate(session.start_time), session.end_time ? "" : "live"].filter(Boolean).join(" · ");
  const summary = document.createElement("p");
  summary.className = session.summary ? "sum" : "sum none";
  summary.textContent = session.summary || "No summary yet.";
  li.append(open, here, meta, summary);
  return li;
}

function highlightCurrentSession() {
  for (const li of ui.sessions.children) {
    const current = state.wanted && li.dataset.sessionId === state.sessionId;
    li.classList.toggle("current", current);
    li.querySelector(".here").textContent = current ? "open here" : "";
    if (current) li.setAttribute("aria-current", "true");
    else li.removeAttribute("aria-current");
  }
}

async function openViewer(sessionId) {
  ui.viewerTitle.textContent = `Session ${sessionId}`;
  ui.viewerMeta.textContent = "Loading…";
  ui.viewerSummary.textContent = "";
  ui.viewerLog.replaceChildren();
  ui.viewerResume.dataset.sessionId = sessionId;
  ui.viewerResume.disabled = state.wanted;
  ui.viewerResume.title = state.wanted ? "Disconnect first to resume another session." : "";
  if (!ui.viewer.open) ui.viewer.showModal();
  try {
    const session = await getJson(`/api/sessions/${encodeURIComponent(sessionId)}`);
    const ended = session.end_time ? `ended ${formatDate(session.end_time)}` : "live";
    ui.viewerMeta.textContent = `Started ${formatDate(session.start_time)} · ${ended} · ${session.message_count} messages`;
    ui.viewerSummary.textContent = session.summary || "No summary yet.";
    for (const event of session.events) {
      const li = messageItem(event.role, event.text);
      const label = markStatus(li, event.status);
      setMeta(li, [label, formatTime(event.created_at), `saved #${event.id}`].filter(Boolean).join(" · "));
      ui.viewerLog.append(li);
    }
  } catch (e) {
    ui.viewerMeta.textContent = `Could not load this session: ${e.message}`;
  }
}

// The stored conversation of the session in the address, shown before Connect (after a Disconnect and a reload,
// or from a link): the page never says "No messages yet" about a session that has messages.
async function showPast(sessionId) {
  const load = ++state.pastLoad;
  const session = await getJson(`/api/sessions/${encodeURIComponent(sessionId)}`).catch(() => null);
  if (load !== state.pastLoad || state.wanted || !session) return;
  state.sessionId = sessionId;
  renderHistory(session.events);
  if (session.summary) showSummary("done", session.summary);
  addNote(session.events.length ? "The saved conversation. Press Connect to continue it." :
    "This session has no messages yet. Press Connect to start it.");
}

function resumeFromViewer() {
  ui.viewer.close();
  ui.sessionId.value = ui.viewerResume.dataset.sessionId;
  connect();
}

// Sending.

function problemWith(text) {
  if (new TextEncoder().encode(text).length > MAX_MESSAGE_BYTES) {
    return `That message is longer than ${MAX_MESSAGE_BYTES / 1024} KiB; shorten it and send again.`;
  }
  if (text.includes("\u0000")) return "That message contains a NUL character, which cannot be sent.";
  return "";
}

function sendMessage(event) {
  event.preventDefault();
  const text = ui.message.value;
  if (!state.wanted || !text.trim()) return;
  const problem = problemWith(text);
  if (problem) {
    addNote(problem, "error");
    return;
  }
  const clientMsgId = `m-${randomHex(8)}`;
  const frame = JSON.stringify({ type: "message", text, client_msg_id: clientMsgId });
  const li = appendToLog(messageItem("user", text));
  li.classList.add("pending");
  ui.log.scrollTop = ui.log.scrollHeight; // the sender always sees what they sent
  state.outbox.set(clientMsgId, { frame, el: li });
  if (state.ready) {
    setMeta(li, "sending…");
    state.ws.send(frame);
  } else {
    setMeta(li, "waiting for the connection…"); // sent by onReady once reconnected
  }
  ui.message.value = "";
}

function stopAnswer() {
  if (state.streaming && state.ready) state.ws.send(JSON.stringify({ type: "cancel" }));
}

function onMessageKey(event) {
  // Enter sends; Shift+Enter is a new line; an IME composing text uses Enter for itself (Safari reports the
  // Enter that ends a composition with isComposing false, but keyCode 229).
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
    event.preventDefault();
    ui.messageForm.requestSubmit();
  } else if (event.key === "Escape" && state.streaming) {
    event.preventDefault();
    stopAnswer();
  }
}

// A reload comes back to where it was.

function saveVisit() {
  const answer = state.answers.get(state.streaming);
  const saved = {
    sessionId: state.sessionId,
    wanted: state.wanted,
    answer: answer ? { response_id: state.streaming, seq: answer.seq, text: textOf(answer.el).textContent } : null,
  };
  try {
    sessionStorage.setItem(SAVED_KEY, JSON.stringify(saved));
  } catch {
    // Storage off or full: a reload then just does not reconnect by itself.
  }
}

function savedVisit() {
  try {
    const saved = JSON.parse(sessionStorage.getItem(SAVED_KEY) || "null");
    const answer = saved?.answer;
    const valid = answer && typeof answer.response_id === "string" && Number.isInteger(answer.seq) &&
      typeof answer.text === "string";
    return saved && { sessionId: saved.sessionId, wanted: saved.wanted === true, answer: valid ? answer : null };
  } catch {
    return null;
  }
}

// Wiring.

function sessionIdInAddress() {
  try {
    const id = decodeURIComponent(location.hash.slice(1));
    return SESSION_ID_RE.test(id) ? id : "";
  } catch {
    return ""; // a malformed %-escape: start fresh
  }
}

function start() {
  const fromAddress = sessionIdInAddress();
  ui.sessionId.value = fromAddress || `chat-${randomHex(5)}`;
  ui.sessionForm.addEventListener("submit", (e) => {
    e.preventDefault();
    if (!state.wanted) connect();
  });
  ui.newId.addEventListener("click", () => {
    ui.sessionId.value = `chat-${randomHex(5)}`;
    ui.sessionId.focus();
  });
  ui.disconnect.addEventListener("click", disconnect);
  // pagehide, not beforeunload: it also fires when a phone's browser puts the tab away.
  window.addEventListener("pagehide", saveVisit);
  ui.messageForm.addEventListener("submit", sendMessage);
  ui.message.addEventListener("keydown", onMessageKey);
  ui.stop.addEventListener("click", stopAnswer);
  ui.refresh.addEventListener("click", loadSessions);
  ui.viewerClose.addEventListener("click", () => ui.viewer.close());
  ui.viewerResume.addEventListener("click", resumeFromViewer);
  // Back online: try now rather than wait out the backoff.
  window.addEventListener("online", () => {
    if (state.retryTimer) {
      clearTimeout(state.retryTimer);
      openSocket();
    }
  });
  loadSessions();
  // This tab was connected to this session before the reload: connect again, and pick up a running answer.
  const saved = savedVisit();
  if (fromAddress && saved?.wanted && saved.sessionId === fromAddress) connect({ restore: saved.answer });
  else if (fromAddress) showPast(fromAddress);
}

start();
