// The chat page's keys panel (SPEC section 16): the user's API keys, listed, made with
// limits, and revoked, through `GET/POST /api/v1/keys` and `DELETE /api/v1/keys/{id}` with
// the session cookie and the CSRF token. Plain browser JavaScript (an ES module).
//
// The raw key of a new key lives only in the text of the `new-key` element, from the answer
// that made it until the user is done with it (the "I have copied it" button, closing the
// panel, making another key, or leaving the page): never in a variable that outlives the
// answer, nor in localStorage, a cookie or the URL. Everything from the server (names,
// model names, error details) is written as text, never as HTML.

import { ApiProblem, allPages, api } from "./api.js";
import { money } from "./money.js";


const $ = (id) => document.getElementById(id);
const els = {
  open: $("keys-open"),
  panel: $("keys-panel"),
  close: $("keys-close"),
  error: $("keys-error"),
  newKeyBox: $("new-key-box"),
  newKey: $("new-key"),
  copy: $("key-copy"),
  copied: $("key-copied"),
  done: $("new-key-done"),
  form: $("key-form"),
  name: $("key-name"),
  budget: $("key-budget"),
  budgetPeriod: $("key-budget-period"),
  rpm: $("key-rpm"),
  tpm: $("key-tpm"),
  maxParallel: $("key-max-parallel"),
  models: $("key-models"),
  expires: $("key-expires"),
  create: $("key-create"),
  list: $("keys-list"),
  empty: $("keys-empty"),
  loading: $("keys-loading"),
  listHeading: $("keys-list-heading"),
};

let loadToken = 0; // a slower list load never overwrites a newer one

function showError(message) {
  els.error.textContent = message;
  els.error.hidden = false;
}

function clearError() {
  els.error.textContent = "";
  els.error.hidden = true;
}

// A plain sentence for a refused request; `doing` says what was refused ("The key was not created").
function describe(err, doing) {
  if (!(err instanceof ApiProblem)) {
    return `${doing}: the server could not be reached (${err && err.message ? err.message : "network error"}).`;
  }
  const { status, code, detail } = err;
  const codeText = code ? ` (${code})` : "";
  // The detail is a sentence of its own ("... Not in the price list: x."): its last full stop moves after the code.
  if (status === 400) return `${doing}: ${(detail || "the server refused it").replace(/\.$/, "")}${codeText}.`;
  if (status === 401 || (status === 403 && code !== "restricted_key")) {
    return `${doing}: your login has expired or this page is out of date. Reload the page and log in again.`;
  }
  if (status === 403) return `${doing}: ${detail}${codeText}`;
  if (status === 404) return `${doing}: this key does not exist any more (it may have been revoked elsewhere).`;
  if (status === 429) return `${doing}: too many requests just now; try again in a moment.`;
  return `${doing}: the server failed (HTTP ${status})${detail ? `: ${detail}` : ""}.`;
}

// --- showing keys ----------------------------------------------------------------------

// An amount as the server wrote it ("0.050000"), without its trailing zeros but with at
// least 2 places ("0.05", "0.00012", "5.00"): a key's budget can be a few cents.
function amount(value) {
  const text = String(value ?? "");
  const match = /^(-?\d+)\.(\d*?)0*$/.exec(text);
  if (!match) return text;
  return `${match[1]}.${match[2].padEnd(2, "0")}`;
}

function when(value) {
  if (!value) return "";
  const date = new Date(value);
  return Number.isNaN(date.getTime()) ? String(value) : date.toLocaleString();
}

const PERIOD_WORDS = { day: "per day", week: "per week", month: "per month", total: "in total" };
const SPENT_WORDS = { day: "today", week: "this week", month: "this month", total: "in total" };

function chip(text, testid) {
  const span = document.createElement("span");
  span.className = "key-chip";
  span.textContent = text;
  if (testid) span.dataset.testid = testid;
  return span;
}

function keyRow(key) {
  const li = document.createElement("li");
  li.className = "key-row";
  li.dataset.testid = "key-row";
  li.dataset.keyId = key.id;

  const head = document.createElement("div");
  head.className = "key-row-head";
  const name = document.createElement("span");
  name.className = "key-row-name";
  name.dataset.testid = "key-row-name";
  name.textContent = key.name || "(no name)";
  if (!key.name) name.classList.add("unnamed");
  const prefix = document.createElement("code");
  prefix.className = "key-row-prefix";
  prefix.dataset.testid = "key-row-prefix";
  prefix.textContent = `${key.prefix}…`;
  prefix.title = "The key's first characters";
  const revoke = document.createElement("button");
  revoke.type = "button";
  revoke.className = "small danger";
  revoke.dataset.testid = "key-revoke";
  revoke.textContent = "Revoke";
  revoke.setAttribute("aria-label", `Revoke the key ${key.name || key.prefix}`);
  revoke.addEventListener("click", () => revokeKey(key, li));
  head.append(name, prefix, revoke);

  const limits = document.createElement("div");
  limits.className = "key-row-limits";
  limits.dataset.testid = "key-row-limits";
  const chips = [];
  if (key.budget !== null && key.budget !== undefined) {
    const chipEl = chip(`budget ${amount(key.budget)} ${PERIOD_WORDS[key.budget_period] || key.budget_period || ""}`.trim(),
      "key-row-budget");
    chipEl.title = `${key.budget} credits`;
    chips.push(chipEl);
  }
  if (key.rpm !== null && key.rpm !== undefined) chips.push(chip(`rpm ${key.rpm}`, "key-row-rpm"));
  if (key.tpm !== null && key.tpm !== undefined) chips.push(chip(`tpm ${key.tpm}`, "key-row-tpm"));
  if (key.max_parallel !== null && key.max_parallel !== undefined) {
    chips.push(chip(`${key.max_parallel} at once`, "key-row-parallel"));
  }
  if (Array.isArray(key.models)) chips.push(chip(`models: ${key.models.join(", ")}`, "key-row-models"));
  if (key.expires_at) {
    const expired = new Date(key.expires_at).getTime() <= Date.now();
    const chipEl = chip(`${expired ? "expired" : "expires"} ${when(key.expires_at)}`, "key-row-expires");
    if (expired) chipEl.classList.add("expired");
    chips.push(chipEl);
  }
  if (!chips.length) chips.push(chip("no limits: it can spend your whole wallet", "key-row-unlimited"));
  limits.append(...chips);

  const meta = document.createElement("div");
  meta.className = "key-row-meta";
  const spent = document.createElement("span");
  spent.dataset.testid = "key-row-spent";
  const period = key.budget !== null && key.budget !== undefined ? key.budget_period : "day";
  spent.textContent = `Spent ${SPENT_WORDS[period] || "this period"}: ${amount(key.spent_this_period)}`
    + (key.budget !== null && key.budget !== undefined ? ` of ${amount(key.budget)}` : "");
  spent.title = `${key.spent_this_period} credits (${money(key.spent_this_period, "up")} at 2 places)`;
  const used = document.createElement("span");
  used.dataset.testid = "key-row-last-used";
  used.textContent = `Last used: ${key.last_used_at ? when(key.last_used_at) : "never"}`;
  const created = document.createElement("span");
  created.dataset.testid = "key-row-created";
  created.textContent = `Created: ${when(key.created_at)}`;
  meta.append(spent, used, created);

  li.append(head, limits, meta);
  return li;
}

function renderKeys(keys) {
  els.list.replaceChildren(...keys.map(keyRow));
  els.empty.hidden = keys.length > 0;
}

async function loadKeys() {
  const token = ++loadToken;
  els.loading.hidden = els.list.children.length > 0;
  try {
    const keys = await allPages("keys");
    if (token !== loadToken) return;
    renderKeys(keys);
  } catch (err) {
    if (token !== loadToken) return;
    showError(describe(err, "The keys could not be loaded"));
  } finally {
    if (token === loadToken) els.loading.hidden = true;
  }
}

// --- the raw key, shown once -----------------------------------------------------------

function forgetNewKey() {
  els.newKey.textContent = "";
  els.copied.textContent = "";
  els.newKeyBox.hidden = true;
}

function selectNewKey() {
  const range = document.createRange();
  range.selectNodeContents(els.newKey);
  const selection = window.getSelection();
  selection.removeAllRanges();
  selection.addRange(range);
}

async function copyNewKey() {
  const text = els.newKey.textContent;
  if (!text) return;
  let copied = false;
  try {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      copied = true;
    }
  } catch {
    copied = false;
  }
  if (!copied) {
    selectNewKey();
    try {
      copied = document.execCommand("copy");
    } catch {
      copied = false;
    }
  }
  els.copied.textContent = copied ? "Copied." : "Could not copy: the key is selected, copy it by hand (Ctrl+C).";
  if (!copied) selectNewKey();
}

// --- making and revoking ---------------------------------------------------------------

// A count field: a number when it is a whole one, else the text as typed (the server says
// what is wrong with it); left out when empty.
function count(input) {
  const text = input.value.trim();
  if (!text) return undefined;
  return /^\d+$/.test(text) ? Number(text) : text;
}

function formBody() {
  const body = {};
  const name = els.name.value.trim();
  if (name) body.name = name;
  const budget = els.budget.value.trim();
  if (budget) {
    body.budget = budget; // a decimal string: never a float
    body.budget_period = els.budgetPeriod.value;
  }
  for (const [field, input] of [["rpm", els.rpm], ["tpm", els.tpm], ["max_parallel", els.maxParallel],
    ["expires_in_days", els.expires]]) {
    const value = count(input);
    if (value !== undefined) body[field] = value;
  }
  const models = els.models.value.split(",").map((m) => m.trim()).filter(Boolean);
  if (models.length) body.models = models;
  return body;
}

async function createKey() {
  clearError();
  forgetNewKey();
  els.create.disabled = true;
  try {
    const { key: raw, ...made } = await api("keys", { method: "POST", body: formBody() });
    els.newKey.textContent = raw; // the one place the raw key is ever kept (see the top)
    els.newKeyBox.hidden = false;
    els.form.reset();
    els.copy.focus();
    // The new key heads the list at once; the reload (newest first) confirms it.
    els.list.prepend(keyRow(made));
    els.empty.hidden = true;
    loadKeys();
  } catch (err) {
    showError(describe(err, "The key was not created"));
  } finally {
    els.create.disabled = false;
  }
}

async function revokeKey(key, row) {
  const label = key.name ? `“${key.name}” (${key.prefix}…)` : `${key.prefix}…`;
  if (!window.confirm(`Revoke the key ${label}? Every script using it stops working at once. This cannot be undone.`)) {
    return;
  }
  clearError();
  for (const button of row.querySelectorAll("button")) button.disabled = true;
  try {
    await api(`keys/${encodeURIComponent(key.id)}`, { method: "DELETE" });
    const hadFocus = row.contains(document.activeElement);
    row.remove();
    els.empty.hidden = els.list.children.length > 0;
    if (hadFocus) els.listHeading.focus(); // not lost to the page's body
  } catch (err) {
    for (const button of row.querySelectorAll("button")) button.disabled = false;
    showError(describe(err, "The key was not revoked"));
  }
  loadKeys();
}

// --- opening and closing ---------------------------------------------------------------

function openPanel() {
  els.panel.hidden = false;
  els.open.setAttribute("aria-expanded", "true");
  clearError();
  loadKeys();
  els.name.focus();
}

function closePanel() {
  forgetNewKey();
  els.panel.hidden = true;
  els.open.setAttribute("aria-expanded", "false");
  els.open.focus();
}

els.open.addEventListener("click", () => (els.panel.hidden ? openPanel() : closePanel()));
els.close.addEventListener("click", closePanel);
// Escape closes the panel when the focus is in it (or nowhere, e.g. after a revoked row went).
document.addEventListener("keydown", (event) => {
  const target = event.target;
  if (event.key === "Escape" && !els.panel.hidden && (els.panel.contains(target) || target === document.body)) {
    event.preventDefault();
    closePanel();
  }
});
els.form.addEventListener("submit", (event) => {
  event.preventDefault();
  createKey();
});
els.copy.addEventListener("click", copyNewKey);
els.done.addEventListener("click", forgetNewKey);
// Leaving the page (or the page going into the back-forward cache) drops the raw key.
window.addEventListener("pagehide", forgetNewKey);
