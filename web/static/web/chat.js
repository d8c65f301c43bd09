// Pantheon's chat page. Plain browser JavaScript (an ES module, no build step).
//
// Talks to the JSON API with the session cookie and the CSRF token. A turn is streamed
// with fetch() + response.body.getReader() and our own SSE parser (EventSource cannot
// POST). A POST is never retried automatically: a turn costs credits, and the server may
// already have it. Model output is only ever written as text (never as HTML).

import { SSEParser } from "./sse.js";

const app = document.getElementById("app");
const API = app.dataset.apiBase || "/api/v1";
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
  messages: document.getElementById("messages"),
  error: document.getElementById("error"),
  form: document.getElementById("composer-form"),
  composer: document.getElementById("composer"),
  send: document.getElementById("send"),
  stop: document.getElementById("stop"),
};

const state = {
  sessions: [],
  currentId: null,
  streaming: null, // {controller, sessionId} while a turn streams
  loading: false, // the selected session's history is loading: sending waits for it
  loadToken: 0, // guards against a slow history load overwriting a newer one
};

// --- helpers -------------------------------------------------------------------------

function csrfToken() {
  for (const part of document.cookie.split(";")) {
    const [name, ...rest] = part.trim().split("=");
    if (name === "csrftoken") return decodeURIComponent(rest.join("="));
  }
  const input = document.querySelector("input[name=csrfmiddlewaretoken]");
  return input ? input.value : "";
}

function isFakeModel(model) {
  return typeof model === "string" && model.startsWith("fake/");
}

class ApiProblem extends Error {
  constructor(status, body) {
    super((body && body.detail) || `HTTP ${status}`);
    this.status = status;
    this.code = (body && body.code) || "";
    this.detail = (body && body.detail) || "";
  }
}

async function api(path, { method = "GET", body } = {}) {
  const headers = { Accept: "application/json" };
  if (method !== "GET") {
    headers["Content-Type"] = "application/json";
    headers["X-CSRFToken"] = csrfToken();
  }
  const response = await fetch(path.startsWith("/") ? path : `${API}/${path}`, {
    method,
    headers,
    credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (!response.ok) throw new ApiProblem(response.status, data);
  return data;
}

// Every item of a paginated list, following `next` (kept same-origin) a bounded number of times.
async function allPages(path, maxPages = 20) {
  const items = [];
  let url = `${API}/${path}${path.includes("?") ? "&" : "?"}page_size=200`;
  for (let page = 0; url && page < maxPages; page++) {
    const data = await api(url);
    items.push(...(data.results || []));
    if (!data.next) break;
    const next = new URL(data.next, window.location.href);
    url = next.pathname + next.search;
  }
  return items;
}

function showError(message) {
  els.error.textContent = message;
  els.error.hidden = false;
}

function clearError() {
  els.error.textContent = "";
  els.error.hidden = true;
}

// A human message for an API error body `{"detail", "code"}` and its status.
function describeProblem(status, code, detail) {
  const more = detail ? ` (${detail})` : "";
  switch (status) {
    case 401:
    case 403:
      return "Your login has expired or this page is out of date. Reload the page and log in again.";
    case 402:
      return `Not enough credits for this message${more}. Ask an administrator to grant you credits.`;
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
  if (typeof balance === "string" && balance) els.balance.textContent = balance;
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

// The assistant's text lives alone in the `assistant-message` element (its textContent is
// exactly the answer); the status and notes sit beside it.
function assistantMessage(text, { status = "completed", model = "", turnId = "" } = {}) {
  const wrap = document.createElement("div");
  wrap.className = "msg msg-assistant";
  const body = document.createElement("div");
  body.className = "msg-body";
  body.dataset.testid = "assistant-message";
  body.dataset.status = status;
  if (turnId) body.dataset.turnId = turnId;
  body.textContent = text;
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
}

function updateComposer() {
  const streaming = state.streaming !== null;
  els.composer.disabled = !state.currentId;
  els.send.disabled = !state.currentId || streaming || state.loading;
  els.stop.disabled = !streaming;
  els.newSession.disabled = streaming;
}

// --- sessions ------------------------------------------------------------------------

function currentSession() {
  return state.sessions.find((s) => s.id === state.currentId) || null;
}

async function selectSession(id) {
  if (state.streaming) return; // the answer streaming now belongs to the session on screen
  state.currentId = id;
  const session = currentSession();
  if (window.location.hash !== `#session=${id}`) history.replaceState(null, "", `#session=${id}`);
  renderSessions();
  els.sessionTitle.textContent = session ? sessionLabel(session) : "";
  els.sessionModel.textContent = session ? session.model : "";
  els.fakeLabel.hidden = !(session && (isFakeModel(session.model) || PROVIDER === "fake"));
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
    option.title = `${m.prompt_price_per_mtok} / ${m.completion_price_per_mtok} credits per million tokens`;
    if (m.model === DEFAULT_MODEL) option.selected = true;
    return option;
  });
  els.modelSelect.replaceChildren(...options);
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

// --- one streamed turn ---------------------------------------------------------------

async function sendMessage() {
  const content = els.composer.value;
  const sessionId = state.currentId;
  if (state.streaming || state.loading || !sessionId || !content.trim()) return;
  clearError();
  const controller = new AbortController();
  state.streaming = { controller, sessionId };
  updateComposer();
  els.composer.value = "";

  const empty = els.messages.querySelector(".empty");
  if (empty) empty.remove();
  const userEl = userMessage(content);
  const session = currentSession();
  const answer = assistantMessage("", { status: "pending", model: session ? session.model : "" });
  els.messages.append(userEl, answer.wrap);
  scrollToEnd(true);

  const finish = () => {
    state.streaming = null;
    updateComposer();
  };
  const stopped = () => {
    answer.body.dataset.status = "cancelled";
    setNote(answer, STATUS_NOTES.cancelled);
    // The server stores the cancelled turn and debits it when it sees the disconnect.
    setTimeout(loadWallet, 1000);
  };

  let response;
  try {
    response = await fetch(`${API}/sessions/${sessionId}/turns/stream`, {
      method: "POST",
      credentials: "same-origin",
      headers: {
        "Content-Type": "application/json",
        Accept: "text/event-stream",
        "X-CSRFToken": csrfToken(),
      },
      body: JSON.stringify({ content }),
      signal: controller.signal,
    });
  } catch (err) {
    if (controller.signal.aborted) stopped();
    else {
      answer.body.dataset.status = "interrupted";
      showError(`Could not reach the server (${err.message}). The message may not have been sent; `
        + "reload the session before sending it again.");
    }
    finish();
    return;
  }

  const type = response.headers.get("Content-Type") || "";
  if (!response.ok || !type.startsWith("text/event-stream")) {
    let body = null;
    try {
      body = await response.json();
    } catch {
      body = null;
    }
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
      if (!els.composer.value) els.composer.value = content;
    }
    showError(describeProblem(response.status, body && body.code, body && body.detail));
    finish();
    return;
  }

  let outcome = null;
  const parser = new SSEParser((event) => {
    let data;
    try {
      data = JSON.parse(event.data);
    } catch {
      return;
    }
    switch (event.event) {
      case "start":
        answer.body.dataset.turnId = data.turn_id || "";
        answer.body.dataset.status = "streaming";
        break;
      case "chunk":
        if (typeof data.delta === "string" && data.delta) {
          answer.body.append(data.delta); // a text node: never parsed as HTML
          scrollToEnd();
        }
        break;
      case "done":
        outcome = "done";
        answer.body.normalize();
        answer.body.dataset.status = data.status || "completed";
        if (data.provider_model) {
          const label = roleLabel("Assistant", data.provider_model);
          answer.label.replaceWith(label);
          answer.label = label;
        }
        setBalance(data.balance);
        if (data.finish_reason === "length") setNote(answer, "Cut short: the answer reached its length limit.");
        else setNote(answer, STATUS_NOTES[data.status] || "");
        els.stop.disabled = true;
        break;
      case "error":
        outcome = "error";
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
  });

  try {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      parser.feed(decoder.decode(value, { stream: true }));
    }
    parser.feed(decoder.decode());
    if (!outcome) {
      answer.body.dataset.status = "interrupted";
      showError("The connection closed before the answer was complete. Reload the session to see what was saved.");
      loadWallet();
    }
  } catch (err) {
    if (controller.signal.aborted) stopped();
    else if (!outcome) {
      answer.body.dataset.status = "interrupted";
      showError(`The connection was lost while the answer was streaming (${err.message}). `
        + "Reload the session to see what was saved.");
      loadWallet();
    }
  }
  finish();
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
  if (state.streaming) state.streaming.controller.abort();
});
els.newSession.addEventListener("click", newSession);

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
  else els.messages.replaceChildren(Object.assign(document.createElement("p"), {
    className: "empty", textContent: "No sessions yet. Choose a model and press “New session”.",
  }));
  app.dataset.ready = "true";
}

start();
