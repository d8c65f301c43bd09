// Pantheon's chat page. Plain browser JavaScript (an ES module, no build step).
//
// Talks to the JSON API with the session cookie and the CSRF token. A turn is streamed
// with fetch() + response.body.getReader() and our own SSE parser (EventSource cannot
// POST, nor resume the way we need). A POST is retried only with the same Idempotency-Key,
// so the server runs (and bills) it once; a started answer is resumed from its events, and
// a reload follows the running turn (see "one streamed turn" below).
//
// An assistant's answer is shown as Markdown through markdown.js (markdown-it with raw HTML
// off, then DOMPurify, then inserted as DOM nodes; docs/chat-page.md); everything else from
// the server or the user (user messages, titles, model names, errors, tool results) is
// only ever written as text (textContent), never as HTML.
//
// Keys: Enter sends, Shift+Enter is a new line, Esc stops the answer being written. A
// screen reader hears "Answer started" and "Answer finished" (the polite `answer-status`
// region), not every piece of the answer as it arrives.
//
// A conversation is a tree (SPEC section 17, docs/conversations.md): the page shows the
// session's current branch, as `GET .../messages` lists it. Each answer can be regenerated
// (a turn with `parent_id` = its question and no content), each user message edited (a turn
// with `parent_id` = the message before it and the new content), and a message with
// siblings has `‹ i/n ›` switches (`PATCH` of the session's `current_leaf_id`, free). The
// title the server's background task writes after the first answer is picked up by polling
// the session for a while. Search lives in search.js; export is two download links.

import { API, ApiProblem, allPages, api, csrfToken } from "./api.js";
import { MarkdownStream, installCopyButtons, renderMarkdown } from "./markdown.js";
import { creditAmounts, money, notEnoughCredits } from "./money.js";
import { SearchBox } from "./search.js";
import { SSEParser } from "./sse.js";

const app = document.getElementById("app");
const DEFAULT_MODEL = app.dataset.defaultModel || "";
const PROVIDER = app.dataset.provider || "";

const els = {
  balance: document.getElementById("balance"),
  modelSelect: document.getElementById("model-select"),
  newSession: document.getElementById("new-session"),
  sessionList: document.getElementById("session-list"),
  sessionTitle: document.getElementById("session-title"),
  sessionModel: document.getElementById("session-model"),
  fakeLabel: document.getElementById("fake-label"),
  sessionsLocked: document.getElementById("sessions-locked"),
  modelFull: document.getElementById("model-full"),
  rename: document.getElementById("rename-session"),
  exportMd: document.getElementById("export-md"),
  exportJson: document.getElementById("export-json"),
  searchInput: document.getElementById("search-input"),
  searchStatus: document.getElementById("search-status"),
  searchResults: document.getElementById("search-results"),
  renameForm: document.getElementById("rename-form"),
  renameInput: document.getElementById("rename-input"),
  renameCancel: document.getElementById("rename-cancel"),
  del: document.getElementById("delete-session"),
  deleteConfirm: document.getElementById("delete-confirm"),
  deleteQuestion: document.getElementById("delete-question"),
  deleteYes: document.getElementById("delete-yes"),
  deleteNo: document.getElementById("delete-no"),
  messages: document.getElementById("messages"),
  answerStatus: document.getElementById("answer-status"),
  error: document.getElementById("error"),
  form: document.getElementById("composer-form"),
  composer: document.getElementById("composer"),
  send: document.getElementById("send"),
  stop: document.getElementById("stop"),
};

const state = {
  sessions: [],
  currentId: null,
  streaming: null, // the LiveTurn while an answer streams (sent here, or followed after a reload)
  loading: false, // the selected session's history is loading: sending waits for it
  loadToken: 0, // guards against a slow history load overwriting a newer one
  busy: false, // a rename or delete of the current session is on its way
  // The branch on screen, one entry per bubble, in order: {el, role, message (from the
  // server's listing; null for a bubble of the turn being written until it is stored),
  // question (an answer's user message: what a regenerate answers again), source (the
  // message whose siblings its switch walks), actions (its row of buttons)}.
  shown: [],
  branchVersion: 0, // bumped whenever the branch on screen is replaced or a turn starts
  editing: null, // the user message being edited: {entry, form, body}
  completedTurns: 0, // completed turns of the session on screen (0: its title is not asked yet)
};

// --- helpers -------------------------------------------------------------------------

// An element showing an amount at 2 places, with the exact amount as its tooltip.
function showMoney(el, value, direction = "down") {
  el.textContent = money(value, direction);
  el.title = `${value} credits`;
  el.dataset.exact = value;
}

function isFakeModel(model) {
  return typeof model === "string" && model.startsWith("fake/");
}

function showError(message) {
  els.error.textContent = message;
  els.error.hidden = false;
}

function clearError() {
  els.error.textContent = "";
  els.error.title = "";
  els.error.hidden = true;
}

// A 402: the amounts from its body; what is available from the wallet if it did not say.
async function showNotEnoughCredits(problem) {
  const amounts = creditAmounts(problem);
  let available = amounts.available;
  showError(notEnoughCredits(problem));
  if (available === null) {
    try {
      const wallet = await api("wallet");
      setBalance(wallet.balance);
      available = wallet.available;
      if (!els.error.hidden) showError(notEnoughCredits(problem, available));
    } catch {
      return;
    }
  }
  const exact = [amounts.needed !== null ? `needs ${amounts.needed}` : "",
    available !== null ? `available ${available}` : ""].filter(Boolean).join(", ");
  if (exact && !els.error.hidden) els.error.title = `Exact amounts: ${exact} credits`;
}

// A human message for an API error body `{"detail", "code"}` and its status.
function describeProblem(status, code, detail) {
  const more = detail ? ` (${detail})` : "";
  switch (status) {
    case 401:
    case 403:
      return "Your login has expired or this page is out of date. Reload the page and log in again.";
    case 402:
      return notEnoughCredits(detail);
    case 404:
      return "This session does not exist any more. Pick another session or start a new one.";
    case 502:
      return `The model provider failed before answering${more}. Nothing was streamed; you can send the message again.`;
    case 504:
      return `The model provider did not answer in time${more}. You can send the message again.`;
    default:
      if (status >= 500) return `The server failed (HTTP ${status})${more}.`;
      return `The message was not accepted${more || ` (HTTP ${status})`}.`;
  }
}

function setBalance(balance) {
  if (typeof balance === "string" && balance) showMoney(els.balance, balance);
}

async function loadWallet() {
  try {
    const wallet = await api("wallet");
    setBalance(wallet.balance);
  } catch (err) {
    if (err instanceof ApiProblem) showError(describeProblem(err.status, err.code, err.detail));
  }
}

function scrollToEnd(force = false) {
  const m = els.messages;
  if (force || m.scrollHeight - m.scrollTop - m.clientHeight < 120) m.scrollTop = m.scrollHeight;
}

// --- rendering -----------------------------------------------------------------------

function roleLabel(text, model) {
  const label = document.createElement("div");
  label.className = "msg-role";
  label.textContent = text;
  if (model) {
    const name = document.createElement("span");
    name.className = "model-name";
    name.textContent = model;
    label.append(" · ", name);
    if (isFakeModel(model)) {
      const fake = document.createElement("span");
      fake.className = "fake-label";
      fake.textContent = "offline fake model";
      label.append(" ", fake);
    }
  }
  return label;
}

function userMessage(text) {
  const wrap = document.createElement("div");
  wrap.className = "msg msg-user";
  const body = document.createElement("div");
  body.className = "msg-body";
  body.dataset.testid = "user-message";
  body.textContent = text;
  wrap.append(roleLabel("You"), body);
  return wrap;
}

// The assistant's answer lives alone in the `assistant-message` element, rendered as
// Markdown (markdown.js: sanitized, never raw HTML); the status and notes sit beside it.
function assistantMessage(text, { status = "completed", model = "", turnId = "" } = {}) {
  const wrap = document.createElement("div");
  wrap.className = "msg msg-assistant";
  const body = document.createElement("div");
  body.className = "msg-body md";
  body.dataset.testid = "assistant-message";
  body.dataset.status = status;
  if (turnId) body.dataset.turnId = turnId;
  if (text) body.append(renderMarkdown(text));
  const note = document.createElement("div");
  note.className = "msg-note";
  note.hidden = true;
  wrap.append(roleLabel("Assistant", model), body, note);
  return { wrap, body, note, label: wrap.firstChild };
}

function setNote(parts, text) {
  parts.note.textContent = text;
  parts.note.hidden = !text;
}

// What a screen reader hears of a streamed answer: its start and its end, politely (the
// `answer-status` live region), never each piece as it arrives.
function announce(text) {
  els.answerStatus.textContent = "";
  els.answerStatus.textContent = text;
}

const STATUS_NOTES = {
  cancelled: "Stopped. The partial answer was saved.",
  failed: "The model provider failed; this answer is incomplete.",
  interrupted: "The server stopped while answering; this is the part it had saved.",
  running: "Still being answered.",
};

function toolMessage(message) {
  const details = document.createElement("details");
  details.className = "msg msg-tool";
  const summary = document.createElement("summary");
  summary.textContent = message.role === "tool" ? "Tool result" : "System";
  const body = document.createElement("pre");
  body.textContent = message.content;
  details.append(summary, body);
  return details;
}

// Which messages of a branch get a bubble, and what each bubble's buttons act on. An
// answer's `question` is the user message before it (a regenerate answers it again); its
// `source` is the first message after that question (the answer itself, or the first step
// of a turn that called tools): the one with the siblings. A tool-call step without text
// gets no bubble; only the last answer of a turn gets buttons.
function describeBranch(messages) {
  const lastAssistant = new Map();
  for (const m of messages) if (m.role === "assistant") lastAssistant.set(m.turn_id, m.id);
  const items = [];
  let question = null;
  let head = null;
  for (const m of messages) {
    if (m.role === "user") {
      question = m;
      head = null;
      items.push({ message: m, role: "user", question: null, source: m });
      continue;
    }
    if (!head) head = m;
    const last = m.role === "assistant" && lastAssistant.get(m.turn_id) === m.id;
    if (m.role === "assistant" && !last && !m.content) continue;
    items.push({
      message: m,
      role: m.role === "assistant" ? "assistant" : "tool",
      question: last ? question : null,
      source: last ? head : null,
    });
  }
  return items;
}

function emptyNote(text) {
  return Object.assign(document.createElement("p"), { className: "empty", textContent: text });
}

function removeEmptyNote() {
  const empty = els.messages.querySelector(".empty");
  if (empty) empty.remove();
}

function renderHistory(messages, turns, { scrollEnd = true } = {}) {
  const statusOf = new Map(turns.map((t) => [t.id, t]));
  state.editing = null;
  state.shown = describeBranch(messages).map((item) => {
    const m = item.message;
    let el;
    if (item.role === "user") {
      el = userMessage(m.content);
    } else if (item.role === "assistant") {
      const turn = statusOf.get(m.turn_id);
      const status = turn ? turn.status : "completed";
      const parts = assistantMessage(m.content, {
        status,
        model: turn ? turn.provider_model || turn.model : "",
        turnId: m.turn_id || "",
      });
      setNote(parts, STATUS_NOTES[status] || "");
      el = parts.wrap;
    } else {
      el = toolMessage(m);
    }
    const entry = { ...item, el, actions: null };
    el.dataset.messageId = m.id;
    renderActions(entry);
    return entry;
  });
  els.messages.replaceChildren(...state.shown.map((entry) => entry.el));
  if (!state.shown.length) els.messages.append(emptyNote("No messages yet. Write the first one below."));
  updateComposer();
  if (scrollEnd) scrollToEnd(true);
}

// --- the buttons of a message: edit, regenerate, ‹ i/n › -----------------------------

function smallButton(text, testid, className, type = "button") {
  const button = document.createElement("button");
  button.type = type;
  button.className = `small ${className}`.trim();
  button.dataset.testid = testid;
  button.textContent = text;
  return button;
}

function actionButton(text, testid, label, onClick) {
  const button = smallButton(text, testid, "msg-action");
  button.setAttribute("aria-label", label);
  button.title = label;
  button.addEventListener("click", onClick);
  return button;
}

// `‹ i/n ›` between the versions of a message (its siblings: same parent, oldest first).
// A button at an end stays disabled (`data-edge`), whatever else updateComposer decides.
function siblingSwitch(entry) {
  const { sibling_index: index, sibling_count: count } = entry.source;
  const what = entry.role === "user" ? "message" : "answer";
  const group = document.createElement("span");
  group.className = "sibling-switch";
  group.setAttribute("role", "group");
  group.setAttribute("aria-label", `Versions of this ${what}`);
  const prev = actionButton("‹", "sibling-prev", `Previous version of this ${what}`,
    () => switchSibling(entry, -1));
  const next = actionButton("›", "sibling-next", `Next version of this ${what}`,
    () => switchSibling(entry, +1));
  if (index <= 1) prev.dataset.edge = "true";
  if (index >= count) next.dataset.edge = "true";
  const position = document.createElement("span");
  position.className = "sibling-pos";
  position.dataset.testid = "sibling-pos";
  position.textContent = `${index}/${count}`;
  position.title = `Version ${index} of ${count}`;
  group.append(prev, position, next);
  return group;
}

// The row under a bubble: its switch (when it has siblings), then Edit on a user message or
// Regenerate on an answer. Only a bubble whose message the server listed gets one.
function renderActions(entry) {
  if (!entry.message || entry.role === "tool") return;
  const parts = [];
  if (entry.source && entry.source.sibling_count > 1) parts.push(siblingSwitch(entry));
  if (entry.role === "user") {
    parts.push(actionButton("Edit", "edit", "Edit this message", () => openEdit(entry)));
  } else if (entry.question) {
    parts.push(actionButton("Regenerate", "regenerate", "Regenerate this answer", () => regenerate(entry)));
  }
  if (!entry.actions) {
    entry.actions = document.createElement("div");
    entry.actions.className = "msg-actions";
    entry.el.append(entry.actions);
  }
  entry.actions.replaceChildren(...parts);
  entry.actions.hidden = !parts.length || (state.editing !== null && state.editing.entry === entry);
  lockActions(entry.actions);
}

// Nothing in the conversation can be regenerated, edited or switched while an answer is
// written, a branch loads, or the session is being renamed or deleted.
function conversationLocked() {
  return state.streaming !== null || state.loading || state.busy;
}

function lockActions(root) {
  const locked = conversationLocked();
  for (const button of root.querySelectorAll(".msg-action")) button.disabled = locked || button.dataset.edge === "true";
  for (const button of root.querySelectorAll(".edit-save")) button.disabled = locked;
}

function sessionLabel(session) {
  if (session.title) return session.title;
  const when = new Date(session.created_at);
  return `Session of ${Number.isNaN(when.getTime()) ? session.created_at : when.toLocaleString()}`;
}

function renderSessions() {
  const items = state.sessions.map((session) => {
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "session-item";
    button.dataset.testid = "session-item";
    button.dataset.sessionId = session.id;
    if (session.id === state.currentId) button.setAttribute("aria-current", "true");
    const title = document.createElement("span");
    title.className = "session-name";
    title.textContent = sessionLabel(session);
    const model = document.createElement("span");
    model.className = "model-name";
    model.textContent = session.model + (isFakeModel(session.model) ? " (fake)" : "");
    button.append(title, model);
    button.addEventListener("click", () => selectSession(session.id));
    li.append(button);
    return li;
  });
  els.sessionList.replaceChildren(...items);
  updateComposer();
}

// While an answer streams it belongs to the session on screen: the list, the new-session
// button and delete are disabled (visibly, with a note saying why) until it ends.
function updateComposer() {
  const streaming = state.streaming !== null;
  const session = currentSession();
  els.composer.disabled = !state.currentId;
  els.send.disabled = !state.currentId || streaming || state.loading;
  els.stop.disabled = !streaming || state.streaming.stopRequested;
  els.newSession.disabled = streaming;
  els.modelSelect.disabled = streaming;
  els.rename.disabled = !session || state.busy;
  els.del.disabled = !session || streaming || state.busy;
  els.sessionList.classList.toggle("locked", streaming);
  els.sessionList.setAttribute("aria-disabled", String(streaming));
  for (const button of els.sessionList.querySelectorAll(".session-item")) button.disabled = streaming;
  els.sessionsLocked.hidden = !streaming;
  if (streaming) closeDeleteConfirm();
  search.setLocked(streaming);
  lockActions(els.messages);
}

// --- sessions ------------------------------------------------------------------------

function currentSession() {
  return state.sessions.find((s) => s.id === state.currentId) || null;
}

function showSessionHeader() {
  const session = currentSession();
  els.sessionTitle.textContent = session ? sessionLabel(session) : "No session selected";
  els.sessionTitle.title = session ? sessionLabel(session) : "";
  els.sessionModel.textContent = session ? session.model : "";
  els.fakeLabel.hidden = !(session && (isFakeModel(session.model) || PROVIDER === "fake"));
  for (const link of [els.exportMd, els.exportJson]) {
    link.hidden = !session;
    if (session) link.href = `${API}/sessions/${encodeURIComponent(session.id)}/export?format=${link.dataset.format}`;
    else link.removeAttribute("href");
  }
}

// A title written after the page drew it (by the server's title task): the header and the
// session's item in the list change in place (a redraw of the list would lose its focus).
function showSessionTitle(session) {
  replaceSession(session);
  if (session.id === state.currentId) showSessionHeader();
  const item = [...els.sessionList.querySelectorAll(".session-item")].find((b) => b.dataset.sessionId === session.id);
  const name = item && item.querySelector(".session-name");
  if (name) name.textContent = sessionLabel(session);
}

function showNoSession() {
  state.currentId = null;
  state.loadToken++;
  state.loading = false;
  if (window.location.hash) history.replaceState(null, "", window.location.pathname + window.location.search);
  closeRename();
  closeDeleteConfirm();
  state.shown = [];
  state.editing = null;
  showSessionHeader();
  renderSessions();
  els.messages.replaceChildren(emptyNote("No sessions yet. Choose a model and press “New session”."));
}

async function selectSession(id) {
  if (state.streaming) return; // the list is disabled meanwhile (updateComposer)
  state.currentId = id;
  if (window.location.hash !== `#session=${id}`) history.replaceState(null, "", `#session=${id}`);
  closeRename();
  closeDeleteConfirm();
  renderSessions();
  showSessionHeader();
  clearError();
  state.shown = [];
  state.editing = null;
  els.messages.replaceChildren();
  await loadBranch(id);
  els.composer.focus();
}

// The session's current branch and its turns, read from the server and drawn whole; the
// newest turn, if it still runs, is followed live. False if a newer load replaced this one
// or it failed (the error is shown).
async function loadBranch(id, { scrollEnd = true } = {}) {
  const token = ++state.loadToken;
  state.branchVersion++;
  state.loading = true;
  updateComposer();
  try {
    const [messages, turns] = await Promise.all([
      allPages(`sessions/${id}/messages`),
      allPages(`sessions/${id}/turns`),
    ]);
    if (token !== state.loadToken) return false;
    state.completedTurns = turns.filter((t) => t.status === "completed").length;
    renderHistory(messages, turns, { scrollEnd });
    const running = runningTurn(messages, turns);
    if (running) attachToTurn(running, id); // marks the page as streaming before the load ends
    return true;
  } catch (err) {
    if (token !== state.loadToken) return false;
    showError(err instanceof ApiProblem ? describeProblem(err.status, err.code, err.detail)
      : `Could not load the messages: ${err.message}`);
    return false;
  } finally {
    if (token === state.loadToken) {
      state.loading = false;
      updateComposer();
    }
  }
}

async function loadModels() {
  const models = await api("models");
  const options = models.map((m) => {
    const option = document.createElement("option");
    option.value = m.model;
    option.textContent = isFakeModel(m.model) ? `${m.model} (offline fake model)` : m.model;
    option.title = `${m.model}: ${m.prompt_price_per_mtok} credits per million prompt tokens, `
      + `${m.completion_price_per_mtok} per million answer tokens`;
    if (m.model === DEFAULT_MODEL) option.selected = true;
    return option;
  });
  els.modelSelect.replaceChildren(...options);
  showModelName();
}

// A closed <select> cuts a long model name: the name is its tooltip, and when it does not
// fit, it is written out in full (wrapping) under the select.
let measureCanvas = null;
function showModelName() {
  const option = els.modelSelect.selectedOptions[0];
  const text = option ? option.textContent : "";
  els.modelSelect.title = option ? option.value : "";
  els.modelFull.textContent = text;
  let cut = false;
  const width = els.modelSelect.clientWidth;
  if (text && width > 0) {
    measureCanvas = measureCanvas || document.createElement("canvas");
    const context = measureCanvas.getContext("2d");
    const style = getComputedStyle(els.modelSelect);
    context.font = `${style.fontStyle} ${style.fontWeight} ${style.fontSize} ${style.fontFamily}`;
    const room = width - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight) - 24; // the arrow
    cut = context.measureText(text).width > room;
  }
  els.modelFull.hidden = !cut;
}

async function loadSessions() {
  const data = await api("sessions?page_size=100");
  state.sessions = data.results || [];
  renderSessions();
}

async function newSession() {
  clearError();
  els.newSession.disabled = true;
  try {
    const body = {};
    if (els.modelSelect.value) body.model = els.modelSelect.value;
    const session = await api("sessions", { method: "POST", body });
    state.sessions.unshift(session);
    await selectSession(session.id);
  } catch (err) {
    showError(err instanceof ApiProblem ? describeProblem(err.status, err.code, err.detail)
      : `Could not create a session: ${err.message}`);
  } finally {
    updateComposer();
  }
}

// --- rename and delete (PATCH / DELETE /sessions/{id}) -------------------------------

function openRename() {
  const session = currentSession();
  if (!session || state.busy) return;
  closeDeleteConfirm();
  els.renameInput.value = session.title || "";
  els.sessionTitle.hidden = true;
  els.rename.hidden = true;
  els.renameForm.hidden = false;
  els.renameInput.focus();
  els.renameInput.select();
}

function closeRename() {
  els.renameForm.hidden = true;
  els.sessionTitle.hidden = false;
  els.rename.hidden = false;
}

function replaceSession(updated) {
  const index = state.sessions.findIndex((s) => s.id === updated.id);
  if (index >= 0) state.sessions[index] = updated;
}

async function saveRename() {
  const session = currentSession();
  if (!session || state.busy) return;
  const title = els.renameInput.value.trim();
  if (title === (session.title || "")) {
    closeRename();
    return;
  }
  clearError();
  state.busy = true;
  updateComposer();
  try {
    const updated = await api(`sessions/${session.id}`, { method: "PATCH", body: { title } });
    replaceSession(updated);
    closeRename();
    renderSessions();
    showSessionHeader();
  } catch (err) {
    if (err instanceof ApiProblem && err.status === 404) {
      forgetSession(session.id);
      showError(describeProblem(404, err.code, err.detail));
    } else if (err instanceof ApiProblem && err.status === 400) {
      showError(`The title was not accepted: ${err.detail || err.code}`);
    } else {
      showError(err instanceof ApiProblem ? describeProblem(err.status, err.code, err.detail)
        : `Could not rename the session: ${err.message}`);
    }
  } finally {
    state.busy = false;
    updateComposer();
  }
}

function askDelete() {
  const session = currentSession();
  if (!session || state.busy || state.streaming) return;
  closeRename();
  els.deleteQuestion.textContent = `Delete “${sessionLabel(session)}” and all its messages? This cannot be undone.`;
  els.deleteConfirm.hidden = false;
  els.deleteNo.focus();
}

function closeDeleteConfirm() {
  els.deleteConfirm.hidden = true;
}

// The session is gone (deleted here, or elsewhere): out of the list, and the next one opens.
function forgetSession(id) {
  const index = state.sessions.findIndex((s) => s.id === id);
  if (index >= 0) state.sessions.splice(index, 1);
  if (state.currentId !== id) {
    renderSessions();
    return;
  }
  const next = state.sessions[Math.min(Math.max(index, 0), state.sessions.length - 1)];
  if (next) selectSession(next.id);
  else showNoSession();
}

async function deleteSession() {
  const session = currentSession();
  if (!session || state.busy || state.streaming) return;
  closeDeleteConfirm();
  clearError();
  state.busy = true;
  updateComposer();
  try {
    await api(`sessions/${session.id}`, { method: "DELETE" });
    state.busy = false;
    forgetSession(session.id);
  } catch (err) {
    state.busy = false;
    if (err instanceof ApiProblem && err.status === 404) {
      forgetSession(session.id); // already gone
    } else if (err instanceof ApiProblem && err.code === "turn_running") {
      showError("An answer is still being written in this session (perhaps in another tab). "
        + "Stop it or wait for it to finish, then delete the session.");
    } else {
      showError(err instanceof ApiProblem ? describeProblem(err.status, err.code, err.detail)
        : `Could not delete the session: ${err.message}`);
    }
  } finally {
    state.busy = false;
    updateComposer();
  }
}

// --- one streamed turn ---------------------------------------------------------------
//
// A send POSTs `{"content", "resumable": true}` (a regenerate `{"parent_id"}`, an edit
// `{"parent_id", "content"}`, each with `"resumable": true`) with an `Idempotency-Key` made
// for that send. Until the `start` event arrives, a network failure (the fetch rejected, or the
// connection closed) repeats the POST with the same key and the same body: the server runs
// the turn once and answers a repeat with that turn's stream, so a retry never pays twice.
// Once `start` arrived the turn id is known, and a dropped connection is resumed from
// `GET /turns/{id}/events` with `Last-Event-ID` (a repeated POST would be the wrong
// request). Events carry rising ids and one already seen is skipped, so nothing shows twice.
// A reload does not cancel a resumable turn: opening a session whose newest turn is still
// running attaches to it the same way. Stop asks the server to cancel the turn
// (`POST /turns/{id}/cancel`); the stream then ends with `done`, status `cancelled`. Only if
// the server cannot be asked is the connection dropped instead.

const POST_RETRY_DELAYS_MS = [500, 1500, 3000]; // at most 4 POSTs of one send
const RESUME_RETRY_DELAYS_MS = [500, 1000, 2000, 4000, 8000]; // reconnects in a row without an event
const CANCEL_RETRY_DELAYS_MS = [300, 1000]; // the cancel POST, when the network fails
const STOP_WAIT_MS = 5000; // after Stop, how long the end of the stream is awaited

function newIdempotencyKey() {
  if (typeof crypto.randomUUID === "function") return crypto.randomUUID();
  // randomUUID needs a secure context (https or localhost); getRandomValues does not.
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const hex = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

function isEventStream(response) {
  return response.ok && (response.headers.get("Content-Type") || "").startsWith("text/event-stream");
}

async function jsonBody(response) {
  try {
    return await response.json();
  } catch {
    return null;
  }
}

// Feeds an SSE response body to `onEvent` until the body ends; rejects if reading fails.
async function readEvents(response, onEvent) {
  const parser = new SSEParser(onEvent);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    parser.feed(decoder.decode(value, { stream: true }));
  }
  parser.feed(decoder.decode());
}

// One answer being streamed into its bubble, over one or more connections.
class LiveTurn {
  constructor(answer, sessionId, turnId = "") {
    this.answer = answer;
    this.sessionId = sessionId;
    this.turnId = turnId;
    this.lastEventId = ""; // the id of the last event received: the Last-Event-ID of a reconnect
    this.outcome = null; // "done" or "error" once the stream's last event arrived
    this.controller = new AbortController(); // aborted only when the page gives up on the stream
    this.stopRequested = false;
    this.cancelSent = false;
    this.retryNote = false; // the note says we are reconnecting
    this.waiting = null; // {timer, resolve} while waiting before a retry
    this.started = false; // "Answer started" was announced
    this.ended = false;
    this.status = ""; // the turn's status, from its `done` event
    // The answer as Markdown, rendered at most once a frame (markdown.js).
    this.markdown = new MarkdownStream(answer.body, { onRender: () => scrollToEnd() });
    answer.body.setAttribute("aria-busy", "true"); // being written: not read out piece by piece
  }

  // The answer is complete (or will not grow any more): rendered for good, and announced.
  end(announcement) {
    if (this.ended) return;
    this.ended = true;
    this.markdown.finish();
    this.answer.body.removeAttribute("aria-busy");
    announce(announcement);
  }

  get signal() {
    return this.controller.signal;
  }

  abort() {
    this.controller.abort();
    this.wakeUp();
  }

  // Waits before a retry; Stop ends the wait early.
  wait(ms) {
    return new Promise((resolve) => {
      this.waiting = { timer: setTimeout(() => this.wakeUp(), ms), resolve };
    });
  }

  wakeUp() {
    const waiting = this.waiting;
    this.waiting = null;
    if (waiting) {
      clearTimeout(waiting.timer);
      waiting.resolve();
    }
  }

  retrying(text) {
    if (this.stopRequested) return;
    setNote(this.answer, text);
    this.retryNote = true;
  }

  progress() {
    if (!this.retryNote) return;
    this.retryNote = false;
    setNote(this.answer, this.stopRequested ? "Stopping…" : "");
  }

  // One event of the turn's stream, live or replayed. An event whose id is not above the
  // last one received was shown already (a resumed stream overlapping the old one): skipped.
  onEvent(event) {
    if (this.outcome) return;
    const id = Number(event.id);
    const last = Number(this.lastEventId);
    if (event.id && this.lastEventId && Number.isFinite(id) && Number.isFinite(last) && id <= last) return;
    if (event.id) this.lastEventId = event.id;
    let data;
    try {
      data = JSON.parse(event.data);
    } catch {
      return;
    }
    if (!data || typeof data !== "object") return;
    const { answer } = this;
    switch (event.event) {
      case "start":
        this.progress();
        if (typeof data.turn_id === "string" && data.turn_id) this.turnId = data.turn_id;
        answer.body.dataset.turnId = this.turnId;
        answer.body.dataset.status = "streaming";
        if (!this.started) {
          this.started = true;
          announce("Answer started.");
        }
        if (this.stopRequested) this.cancel();
        break;
      case "chunk":
        this.progress();
        answer.body.dataset.status = "streaming";
        if (typeof data.delta === "string" && data.delta) this.markdown.append(data.delta);
        break;
      case "done":
        this.outcome = "done";
        this.status = data.status || "completed";
        this.retryNote = false;
        answer.body.dataset.status = data.status || "completed";
        this.end(data.status === "cancelled" ? "Answer stopped."
          : data.finish_reason === "length" ? "Answer finished: it reached its length limit."
            : data.status === "failed" ? "Answer failed." : "Answer finished.");
        if (data.provider_model) {
          const label = roleLabel("Assistant", data.provider_model);
          answer.label.replaceWith(label);
          answer.label = label;
        }
        setBalance(data.balance);
        if (data.finish_reason === "length") setNote(answer, "Cut short: the answer reached its length limit.");
        else if (data.status === "cancelled" && !this.stopRequested) {
          // Stopped elsewhere (another tab, an API client) or by the server.
          setNote(answer, "Stopped before it was complete (not from this page). The partial answer was saved.");
        } else setNote(answer, STATUS_NOTES[data.status] || "");
        els.stop.disabled = true;
        break;
      case "error":
        this.outcome = "error";
        this.retryNote = false;
        this.end(data.code === "persistence_failed" ? "Answer finished, not saved yet." : "Answer failed.");
        els.stop.disabled = true;
        if (data.code === "persistence_failed") {
          // The answer arrived but is not stored yet: the server stores and bills it later.
          answer.body.dataset.status = "unsaved";
          setNote(answer, "Not saved yet; it will be stored from what the server had saved.");
          showError("The answer could not be saved just now. It will be stored (and billed) from what "
            + "the server had saved, within a minute or so.");
          break;
        }
        answer.body.dataset.status = "failed";
        setNote(answer, STATUS_NOTES.failed);
        showError(`The model provider failed while answering (${data.message || data.code}). `
          + "The partial answer was saved.");
        loadWallet();
        break;
      default:
        break;
    }
  }

  // Stop: the server is asked to cancel the turn, and the stream ends with its `done`.
  stop() {
    if (this.stopRequested || this.outcome) return;
    this.stopRequested = true;
    this.retryNote = false;
    setNote(this.answer, "Stopping…");
    updateComposer();
    if (this.turnId) {
      this.cancel();
    } else if (this.waiting) {
      this.abort(); // waiting to send again: the turn may never have reached the server
    } else {
      // The turn id comes with `start`, which cancels on arrival; give up if it never comes.
      setTimeout(() => {
        if (!this.turnId && !this.outcome) this.abort();
      }, STOP_WAIT_MS);
    }
  }

  async cancel() {
    if (this.cancelSent || !this.turnId || this.outcome) return;
    this.cancelSent = true;
    let asked = false;
    for (let attempt = 0; !asked; attempt++) {
      try {
        const response = await fetch(`${API}/turns/${encodeURIComponent(this.turnId)}/cancel`, {
          method: "POST",
          credentials: "same-origin",
          headers: { Accept: "application/json", "X-CSRFToken": csrfToken() },
        });
        asked = response.ok; // 202 while it runs, 200 if it had ended already
        if (!asked) break;
      } catch {
        if (attempt >= CANCEL_RETRY_DELAYS_MS.length) break;
        await new Promise((resolve) => setTimeout(resolve, CANCEL_RETRY_DELAYS_MS[attempt]));
      }
      if (this.outcome) return;
    }
    if (!asked) {
      this.abort(); // the server could not be asked: drop the connection instead
      return;
    }
    setTimeout(() => {
      if (!this.outcome) this.abort();
    }, STOP_WAIT_MS);
  }

  // The stream ended without its last event, or the page gave up on it.
  settle(result) {
    if (this.outcome) return;
    const { answer } = this;
    this.retryNote = false;
    this.end(result.aborted ? "Answer stopped." : "Answer interrupted.");
    if (result.aborted) {
      answer.body.dataset.status = "cancelled";
      setNote(answer, this.turnId ? STATUS_NOTES.cancelled : "Stopped before the answer started.");
      // The server stores the cancelled turn and debits it when it sees the stop.
      setTimeout(loadWallet, 1000);
      return;
    }
    answer.body.dataset.status = "interrupted";
    if (result.refused) {
      const { status, body } = result.refused;
      setNote(answer, "");
      showError(status === 401 || status === 403 ? describeProblem(status, "", "")
        : `The answer could not be followed (HTTP ${status}${body && body.detail ? `: ${body.detail}` : ""}). `
          + "Reload the page to see what was saved.");
    } else if (!this.turnId) {
      setNote(answer, "");
      const reason = result.error && result.error.message ? ` (${result.error.message})` : "";
      showError(`Could not reach the server${reason}. If the message arrived, reloading the page shows `
        + "its answer; send it again only if it is not there.");
    } else {
      setNote(answer, "The connection was lost; the server may still be answering.");
      showError("The connection was lost while the answer was streaming. Reload the page to follow it "
        + "or to see what was saved.");
    }
    loadWallet();
  }
}

// The POST of one send, repeated with the same Idempotency-Key while no `start` arrived.
// Resolves to {} (the stream ended with its last event), {resume: true} (it started, then
// dropped), {aborted: true}, {response} (refused with an HTTP error) or {error} (gave up).
async function postTurn(live, request) {
  const key = newIdempotencyKey();
  const body = JSON.stringify({ ...request, resumable: true });
  for (let attempt = 0; ; attempt++) {
    let error = null;
    try {
      const response = await fetch(`${API}/sessions/${live.sessionId}/turns/stream`, {
        method: "POST",
        credentials: "same-origin",
        headers: {
          "Content-Type": "application/json",
          Accept: "text/event-stream",
          "X-CSRFToken": csrfToken(),
          "Idempotency-Key": key,
        },
        body,
        signal: live.signal,
      });
      if (!isEventStream(response)) return { response };
      await readEvents(response, (event) => live.onEvent(event));
      if (live.outcome) return {};
      error = new Error("the connection closed before the answer was complete");
    } catch (err) {
      error = err;
    }
    if (live.outcome) return {};
    if (live.signal.aborted) return { aborted: true };
    if (live.turnId) return { resume: true };
    if (attempt >= POST_RETRY_DELAYS_MS.length) return { error };
    live.retrying("Connection problem; sending again…");
    await live.wait(POST_RETRY_DELAYS_MS[attempt]);
    if (live.signal.aborted) return { aborted: true };
  }
}

// Follows a started turn from GET /turns/{id}/events until its last event, reconnecting with
// Last-Event-ID. Resolves to {}, {aborted: true}, {refused: {status, body}} or {error}.
async function followTurn(live) {
  let failures = 0;
  for (;;) {
    const before = live.lastEventId;
    let error = null;
    try {
      const headers = { Accept: "text/event-stream" };
      if (live.lastEventId) headers["Last-Event-ID"] = live.lastEventId;
      const response = await fetch(`${API}/turns/${encodeURIComponent(live.turnId)}/events`, {
        credentials: "same-origin",
        cache: "no-store",
        headers,
        signal: live.signal,
      });
      if (isEventStream(response)) {
        await readEvents(response, (event) => live.onEvent(event));
        error = new Error("the connection closed before the answer was complete");
      } else if (response.status < 500) {
        return { refused: { status: response.status, body: await jsonBody(response) } };
      } else {
        error = new Error(`HTTP ${response.status}`);
      }
    } catch (err) {
      error = err;
    }
    if (live.outcome) return {};
    if (live.signal.aborted) return { aborted: true };
    if (live.lastEventId !== before) failures = 0; // it got further: a fresh set of attempts
    if (failures >= RESUME_RETRY_DELAYS_MS.length) return { error };
    live.retrying("Connection lost; reconnecting…");
    await live.wait(RESUME_RETRY_DELAYS_MS[failures++]);
    if (live.signal.aborted) return { aborted: true };
  }
}

function endStreaming(live) {
  if (state.streaming === live) {
    state.streaming = null;
    updateComposer();
  }
}

// After a reload (or on opening a session): the newest turn still runs, so its answer is
// streamed into a new bubble, from the start, exactly as a live one.
async function attachToTurn(turn, sessionId) {
  const answer = assistantMessage("", {
    status: "pending", model: turn.provider_model || turn.model || "", turnId: turn.id,
  });
  removeEmptyNote();
  showEntries([{ el: answer.wrap, role: "assistant", message: null, actions: null }]);
  scrollToEnd(true);
  const live = new LiveTurn(answer, sessionId, turn.id);
  state.streaming = live;
  const version = ++state.branchVersion;
  updateComposer();
  try {
    live.settle(await followTurn(live));
  } finally {
    endStreaming(live);
  }
  afterTurn(live, version);
}

// The turn to follow when a session opens: its newest, if that still runs and its answer
// is not stored yet (the list may have been read just before it ended).
function runningTurn(messages, turns) {
  let newest = null;
  for (const turn of turns) {
    if (turn.kind === "title") continue; // the session's title being written: no answer to show
    if (!newest || String(turn.created_at) >= String(newest.created_at)) newest = turn;
  }
  if (!newest || newest.status !== "running") return null;
  if (messages.some((m) => m.role === "assistant" && m.turn_id === newest.id)) return null;
  return newest;
}

// Bubbles at the end of the branch on screen, and taken away from it (returned, so a
// refused turn can put back what gave way to it).
function showEntries(entries) {
  els.messages.append(...entries.map((entry) => entry.el));
  state.shown.push(...entries);
}

function dropEntries(from) {
  const dropped = state.shown.splice(from);
  for (const entry of dropped) entry.el.remove();
  return dropped;
}

// One turn sent from this page: a new message (`text`) after the branch, a new answer to a
// question (a regenerate: `text` null), or a new version of a user message (an edit). The
// bubbles from `keep` on give way to the new turn's; `refused(dropped)` is called when the
// server refused the turn before storing anything (a 402, a 400...), with those bubbles.
async function runTurn({ request, keep = state.shown.length, text = null, refused }) {
  const sessionId = state.currentId;
  clearError();
  closeEdit();
  const dropped = dropEntries(keep);
  removeEmptyNote();
  const session = currentSession();
  const model = session ? session.model : "";
  const fresh = [];
  if (text !== null) fresh.push({ el: userMessage(text), role: "user", message: null, actions: null });
  const answer = assistantMessage("", { status: "pending", model });
  fresh.push({ el: answer.wrap, role: "assistant", message: null, actions: null });
  showEntries(fresh);
  scrollToEnd(true);
  const live = new LiveTurn(answer, sessionId);
  state.streaming = live;
  const version = ++state.branchVersion;
  updateComposer();

  try {
    let result = await postTurn(live, request);
    if (result.response) {
      const { response } = result;
      const body = await jsonBody(response);
      if (response.status === 502 || response.status === 504) {
        // The failed turn is stored (with the user's message); nothing was answered.
        const failed = assistantMessage("", { status: "failed", model });
        setNote(failed, "No answer: the model provider failed.");
        answer.wrap.replaceWith(failed.wrap);
        state.shown[state.shown.length - 1].el = failed.wrap;
        live.outcome = "error";
        loadWallet();
      } else {
        // Refused before anything was stored: what gave way comes back.
        dropEntries(keep);
        showEntries(dropped);
        if (!state.shown.length) els.messages.append(emptyNote("No messages yet. Write the first one below."));
        endStreaming(live); // first: `refused` may open the editor again, which waits for no stream
        if (refused) refused(dropped);
      }
      if (response.status === 402) showNotEnoughCredits(body);
      else showError(describeProblem(response.status, body && body.code, body && body.detail));
      return;
    }
    if (result.resume) result = await followTurn(live);
    live.settle(result);
  } finally {
    endStreaming(live);
    afterTurn(live, version);
  }
}

async function sendMessage() {
  const content = els.composer.value;
  if (state.streaming || state.loading || !state.currentId || !content.trim()) return;
  els.composer.value = "";
  await runTurn({
    request: { content },
    text: content,
    refused: () => {
      if (!els.composer.value) els.composer.value = content; // given back, not lost
    },
  });
}

// After a turn's stream ended: its bubbles learn their messages from the server (so they
// get their buttons), and the first completed answer of an untitled session waits for the
// title the server's task writes.
function afterTurn(live, version) {
  if (live.status === "completed") {
    const session = state.sessions.find((s) => s.id === live.sessionId);
    if (session && !session.title && state.completedTurns === 0) awaitTitle(live.sessionId);
    if (live.sessionId === state.currentId) state.completedTurns++;
  }
  if (live.outcome) syncBranch(live.sessionId, version);
}

// The server's branch, matched to the bubbles on screen without drawing any of them again
// (an answer drawn again would be parsed again, and would lose the notes its stream left):
// a bubble keeps its message, or takes the listed message in its place with the same role
// (the bubbles of the turn just written). A branch that is not the one on screen (a
// regenerate followed after a reload streams below the answer it replaces: the server moves
// the branch only when the turn closes) is drawn again whole.
async function syncBranch(sessionId, version) {
  let messages;
  try {
    messages = await allPages(`sessions/${sessionId}/messages`);
  } catch {
    return;
  }
  if (sessionId !== state.currentId || version !== state.branchVersion || state.streaming || state.loading) return;
  const items = describeBranch(messages);
  for (let i = 0; i < state.shown.length && i < items.length; i++) {
    const entry = state.shown[i];
    const item = items[i];
    const fits = entry.message ? entry.message.id === item.message.id : entry.role === item.role;
    if (!fits) {
      loadBranch(sessionId, { scrollEnd: false });
      return;
    }
    Object.assign(entry, item);
    entry.el.dataset.messageId = item.message.id;
    renderActions(entry);
  }
}

// --- regenerate, edit, switch ----------------------------------------------------------

function entryIndex(entry) {
  return state.shown.indexOf(entry);
}

// A new answer to the same question, beside the earlier ones: everything after the question
// gives way to it while it streams.
function regenerate(entry) {
  if (conversationLocked() || !entry.question) return;
  const at = state.shown.findIndex((e) => e.message && e.message.id === entry.question.id);
  if (at < 0) return;
  runTurn({ request: { parent_id: entry.question.id }, keep: at + 1 });
}

// The message becomes a text field with Save and Cancel; Enter saves, Shift+Enter is a new
// line, Esc cancels (and only cancels: its default is prevented, so no answer stops).
function openEdit(entry, text = null) {
  if (conversationLocked() || !entry.message) return;
  closeEdit();
  const body = entry.el.querySelector(".msg-body");
  const form = document.createElement("form");
  form.className = "edit-form";
  const field = document.createElement("textarea");
  field.className = "edit-input";
  field.dataset.testid = "edit-input";
  field.rows = Math.min(10, Math.max(3, entry.message.content.split("\n").length + 1));
  field.value = text !== null ? text : entry.message.content;
  field.setAttribute("aria-label", "Edit your message");
  const save = smallButton("Save", "edit-save", "edit-save", "submit");
  const cancel = smallButton("Cancel", "edit-cancel", "");
  const buttons = document.createElement("div");
  buttons.className = "edit-buttons";
  buttons.append(save, cancel);
  form.append(field, buttons);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    saveEdit();
  });
  cancel.addEventListener("click", () => closeEdit({ focus: true }));
  field.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      saveEdit();
    } else if (event.key === "Escape" && !event.isComposing) {
      event.preventDefault();
      closeEdit({ focus: true });
    }
  });
  body.hidden = true;
  if (entry.actions) entry.actions.hidden = true;
  entry.el.classList.add("editing");
  body.after(form);
  state.editing = { entry, form, body };
  lockActions(form);
  field.focus();
  field.setSelectionRange(field.value.length, field.value.length);
}

function closeEdit({ focus = false } = {}) {
  const editing = state.editing;
  if (!editing) return;
  state.editing = null;
  editing.form.remove();
  editing.body.hidden = false;
  editing.entry.el.classList.remove("editing");
  if (editing.entry.actions) {
    editing.entry.actions.hidden = !editing.entry.actions.children.length;
    const button = editing.entry.actions.querySelector("[data-testid=edit]");
    if (focus && button) button.focus();
  }
}

// The new version is a sibling of the message: a turn continuing from the message's own
// parent (`null`, sent as such, for the first message: a new root).
function saveEdit() {
  const editing = state.editing;
  if (!editing || conversationLocked()) return;
  const { entry } = editing;
  const content = editing.form.querySelector("textarea").value;
  if (!content.trim()) return;
  if (content === entry.message.content) {
    closeEdit({ focus: true });
    return;
  }
  const at = entryIndex(entry);
  if (at < 0) return;
  runTurn({
    request: { parent_id: entry.message.parent_id ?? null, content },
    keep: at,
    text: content,
    refused: () => openEdit(entry, content), // the edit is not lost
  });
}

// `‹` / `›`: the sibling before or after the one shown (from every message of the session:
// same parent, the server's order), made the branch's (PATCH `current_leaf_id`: the server
// picks the newest leaf below it; free), then the branch is read again and drawn.
async function switchSibling(entry, delta) {
  const source = entry.source;
  const sessionId = state.currentId;
  if (conversationLocked() || !source || !sessionId) return;
  clearError();
  closeEdit();
  const token = state.loadToken;
  let handedOver = false; // to loadBranch, which ends the loading state itself
  state.loading = true; // nothing is sent meanwhile: the branch is about to change
  updateComposer();
  try {
    const all = await allPages(`sessions/${sessionId}/messages?all=true`);
    const target = all.find((m) => (m.parent_id ?? null) === (source.parent_id ?? null)
      && m.sibling_index === source.sibling_index + delta);
    // No such sibling (the tree changed elsewhere): the branch is read again all the same.
    if (target) await api(`sessions/${sessionId}`, { method: "PATCH", body: { current_leaf_id: target.id } });
    if (token !== state.loadToken) return; // another session was opened meanwhile
    handedOver = true;
    if (await loadBranch(sessionId, { scrollEnd: false })) refocusSwitch(entry, source, delta);
  } catch (err) {
    if (token === state.loadToken) {
      showError(err instanceof ApiProblem ? describeProblem(err.status, err.code, err.detail)
        : `Could not switch to that version: ${err.message}`);
    }
  } finally {
    if (!handedOver && token === state.loadToken) {
      state.loading = false;
      updateComposer();
    }
  }
}

// After a switch the keyboard stays where it was: on the same switch, in the redrawn branch.
function refocusSwitch(entry, source, delta) {
  const same = state.shown.find((e) => e.role === entry.role && e.source
    && (e.source.parent_id ?? null) === (source.parent_id ?? null));
  if (!same || !same.actions) return;
  same.el.scrollIntoView({ block: "nearest" });
  const wanted = same.actions.querySelector(`[data-testid=${delta < 0 ? "sibling-prev" : "sibling-next"}]`);
  const other = same.actions.querySelector(`[data-testid=${delta < 0 ? "sibling-next" : "sibling-prev"}]`);
  const target = wanted && !wanted.disabled ? wanted : other;
  if (target) target.focus();
}

// --- the title, when the server's task has written it -----------------------------------

const TITLE_POLL_MS = 1000;
const TITLE_POLL_TRIES = 15; // the task runs on the worker, usually within a few seconds
const titlePolls = new Set();

async function awaitTitle(sessionId) {
  if (titlePolls.has(sessionId)) return;
  titlePolls.add(sessionId);
  try {
    for (let attempt = 0; attempt < TITLE_POLL_TRIES; attempt++) {
      await new Promise((resolve) => setTimeout(resolve, TITLE_POLL_MS));
      const known = state.sessions.find((s) => s.id === sessionId);
      if (!known || known.title) return; // deleted, or renamed here meanwhile
      let session;
      try {
        session = await api(`sessions/${sessionId}`);
      } catch (err) {
        if (err instanceof ApiProblem && err.status === 404) return;
        continue;
      }
      if (session.title) {
        showSessionTitle(session);
        return;
      }
    }
  } finally {
    titlePolls.delete(sessionId);
  }
}

// --- search ------------------------------------------------------------------------------

// A hit opens its session (fetched if it is not among those listed); a message hit is shown,
// and if it is not on the session's current branch, its branch is switched to (free).
async function openSearchHit(hit) {
  if (state.streaming) return;
  clearError();
  if (!state.sessions.some((s) => s.id === hit.session_id)) {
    try {
      state.sessions.push(await api(`sessions/${encodeURIComponent(hit.session_id)}`));
    } catch (err) {
      showError(err instanceof ApiProblem ? describeProblem(err.status, err.code, err.detail)
        : `Could not open that session: ${err.message}`);
      return;
    }
  }
  await selectSession(hit.session_id);
  if (!hit.message_id || state.currentId !== hit.session_id) return;
  let entry = state.shown.find((e) => e.message && e.message.id === hit.message_id);
  if (!entry && !state.streaming) {
    try {
      await api(`sessions/${hit.session_id}`, { method: "PATCH", body: { current_leaf_id: hit.message_id } });
      await loadBranch(hit.session_id, { scrollEnd: false });
    } catch {
      return; // the session is open; the message may have gone
    }
    entry = state.shown.find((e) => e.message && e.message.id === hit.message_id);
  }
  if (entry) {
    entry.el.scrollIntoView({ block: "center" });
    entry.el.classList.add("found");
    setTimeout(() => entry.el.classList.remove("found"), 2000);
  }
}

// --- wiring --------------------------------------------------------------------------

els.form.addEventListener("submit", (event) => {
  event.preventDefault();
  sendMessage();
});
els.composer.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    sendMessage();
  }
});
els.stop.addEventListener("click", () => {
  if (state.streaming) state.streaming.stop();
});
els.newSession.addEventListener("click", newSession);
els.modelSelect.addEventListener("change", showModelName);
window.addEventListener("resize", showModelName);
els.rename.addEventListener("click", openRename);
els.renameForm.addEventListener("submit", (event) => {
  event.preventDefault();
  saveRename();
});
els.renameInput.addEventListener("keydown", (event) => {
  if (event.key === "Escape") {
    event.preventDefault();
    closeRename();
  }
});
els.renameCancel.addEventListener("click", closeRename);
els.del.addEventListener("click", askDelete);
els.deleteYes.addEventListener("click", deleteSession);
els.deleteNo.addEventListener("click", closeDeleteConfirm);
els.deleteConfirm.addEventListener("keydown", (event) => {
  if (event.key === "Escape") {
    event.preventDefault(); // this Esc closes the question: it does not stop the answer too
    closeDeleteConfirm();
  }
});
// Esc stops the answer being written (POST /turns/{id}/cancel, as Stop does), wherever the
// focus is, unless that Esc was someone else's: closing the rename field, the delete
// question or the keys panel (their handlers run first and prevent the default).
window.addEventListener("keydown", (event) => {
  if (event.key !== "Escape" || event.defaultPrevented || event.isComposing || !state.streaming) return;
  event.preventDefault();
  state.streaming.stop();
});
installCopyButtons(els.messages);
const search = new SearchBox({
  input: els.searchInput, status: els.searchStatus, list: els.searchResults, open: openSearchHit,
});

async function start() {
  updateComposer();
  try {
    await Promise.all([loadWallet(), loadModels(), loadSessions()]);
  } catch (err) {
    showError(err instanceof ApiProblem ? describeProblem(err.status, err.code, err.detail)
      : `Could not load the page's data: ${err.message}`);
    return;
  }
  const wanted = (window.location.hash.match(/^#session=([0-9a-f-]+)$/i) || [])[1];
  const first = state.sessions.find((s) => s.id === wanted) || state.sessions[0];
  if (first) await selectSession(first.id);
  else showNoSession();
  app.dataset.ready = "true";
}

start();
