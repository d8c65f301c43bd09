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

import { API, ApiProblem, allPages, api, csrfToken } from "./api.js";
import { MarkdownStream, installCopyButtons, renderMarkdown } from "./markdown.js";
import { creditAmounts, money, notEnoughCredits } from "./money.js";
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

function renderHistory(messages, turns) {
  const statusOf = new Map(turns.map((t) => [t.id, t]));
  // The answer of a turn is its last assistant message; earlier ones are tool-call steps.
  const lastAssistant = new Map();
  for (const m of messages) if (m.role === "assistant") lastAssistant.set(m.turn_id, m.id);
  const nodes = [];
  for (const m of messages) {
    if (m.role === "user") {
      nodes.push(userMessage(m.content));
    } else if (m.role === "assistant") {
      if (lastAssistant.get(m.turn_id) !== m.id && !m.content) continue;
      const turn = statusOf.get(m.turn_id);
      const status = turn ? turn.status : "completed";
      const parts = assistantMessage(m.content, {
        status,
        model: turn ? turn.provider_model || turn.model : "",
        turnId: m.turn_id || "",
      });
      setNote(parts, STATUS_NOTES[status] || "");
      nodes.push(parts.wrap);
    } else {
      nodes.push(toolMessage(m));
    }
  }
  els.messages.replaceChildren(...nodes);
  if (!nodes.length) {
    const empty = document.createElement("p");
    empty.className = "empty";
    empty.textContent = "No messages yet. Write the first one below.";
    els.messages.append(empty);
  }
  scrollToEnd(true);
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
}

function showNoSession() {
  state.currentId = null;
  state.loadToken++;
  state.loading = false;
  if (window.location.hash) history.replaceState(null, "", window.location.pathname + window.location.search);
  closeRename();
  closeDeleteConfirm();
  showSessionHeader();
  renderSessions();
  els.messages.replaceChildren(Object.assign(document.createElement("p"), {
    className: "empty", textContent: "No sessions yet. Choose a model and press “New session”.",
  }));
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
  const token = ++state.loadToken;
  state.loading = true;
  updateComposer();
  els.messages.replaceChildren();
  try {
    const [messages, turns] = await Promise.all([
      allPages(`sessions/${id}/messages`),
      allPages(`sessions/${id}/turns`),
    ]);
    if (token !== state.loadToken) return;
    renderHistory(messages, turns);
    const running = runningTurn(messages, turns);
    if (running) attachToTurn(running, id); // marks the page as streaming before the load ends
  } catch (err) {
    if (token !== state.loadToken) return;
    showError(err instanceof ApiProblem ? describeProblem(err.status, err.code, err.detail)
      : `Could not load the messages: ${err.message}`);
  } finally {
    if (token === state.loadToken) {
      state.loading = false;
      updateComposer();
    }
  }
  els.composer.focus();
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
// A send POSTs `{"content", "resumable": true}` with an `Idempotency-Key` made for that
// send. Until the `start` event arrives, a network failure (the fetch rejected, or the
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
async function postTurn(live, content) {
  const key = newIdempotencyKey();
  const body = JSON.stringify({ content, resumable: true });
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
  const empty = els.messages.querySelector(".empty");
  if (empty) empty.remove();
  els.messages.append(answer.wrap);
  scrollToEnd(true);
  const live = new LiveTurn(answer, sessionId, turn.id);
  state.streaming = live;
  updateComposer();
  try {
    live.settle(await followTurn(live));
  } finally {
    endStreaming(live);
  }
}

// The turn to follow when a session opens: its newest, if that still runs and its answer
// is not stored yet (the list may have been read just before it ended).
function runningTurn(messages, turns) {
  let newest = null;
  for (const turn of turns) {
    if (!newest || String(turn.created_at) >= String(newest.created_at)) newest = turn;
  }
  if (!newest || newest.status !== "running") return null;
  if (messages.some((m) => m.role === "assistant" && m.turn_id === newest.id)) return null;
  return newest;
}

async function sendMessage() {
  const content = els.composer.value;
  const sessionId = state.currentId;
  if (state.streaming || state.loading || !sessionId || !content.trim()) return;
  clearError();
  els.composer.value = "";

  const empty = els.messages.querySelector(".empty");
  if (empty) empty.remove();
  const userEl = userMessage(content);
  const session = currentSession();
  const answer = assistantMessage("", { status: "pending", model: session ? session.model : "" });
  els.messages.append(userEl, answer.wrap);
  scrollToEnd(true);
  const live = new LiveTurn(answer, sessionId);
  state.streaming = live;
  updateComposer();

  try {
    let result = await postTurn(live, content);
    if (result.response) {
      const { response } = result;
      const body = await jsonBody(response);
      answer.wrap.remove();
      if (response.status === 502 || response.status === 504) {
        // The failed turn is stored (with the user's message); nothing was answered.
        const failed = assistantMessage("", { status: "failed", model: session ? session.model : "" });
        setNote(failed, "No answer: the model provider failed.");
        els.messages.append(failed.wrap);
        loadWallet();
      } else {
        // Refused before anything was stored: give the text back.
        userEl.remove();
        if (!els.messages.children.length) {
          els.messages.append(Object.assign(document.createElement("p"), {
            className: "empty", textContent: "No messages yet. Write the first one below.",
          }));
        }
        if (!els.composer.value) els.composer.value = content;
      }
      if (response.status === 402) showNotEnoughCredits(body);
      else showError(describeProblem(response.status, body && body.code, body && body.detail));
      return;
    }
    if (result.resume) result = await followTurn(live);
    live.settle(result);
  } finally {
    endStreaming(live);
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
