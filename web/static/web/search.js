// The sidebar's search box (SPEC section 17): `GET /api/v1/search?q=` as the user types.
//
// Each hit shows its session's title and the snippet around the match, both written as text
// (textContent): a title or a message may hold anything, HTML included, and is never
// markup here. Typing is debounced, so a word typed is one request, not one per key; an
// answer that arrives after a newer query was sent is dropped; an empty box clears the
// results. Choosing a hit is the page's business (`open`).

import { ApiProblem, api } from "./api.js";

const DEBOUNCE_MS = 250;
const PAGE_SIZE = 20;

export class SearchBox {
  // `open(hit)` is called when a hit is chosen; `untitled` names a session with no title.
  constructor({ input, status, list, open, untitled = "Untitled session" }) {
    Object.assign(this, { input, status, list, open, untitled });
    this.timer = null;
    this.asked = 0; // the number of the newest query sent: older answers are dropped
    this.locked = false;
    input.addEventListener("input", () => this.schedule());
    input.addEventListener("keydown", (event) => this.onKeydown(event));
  }

  schedule() {
    clearTimeout(this.timer);
    if (!this.input.value.trim()) {
      this.clear();
      return;
    }
    this.timer = setTimeout(() => this.run(), DEBOUNCE_MS);
  }

  // Esc empties a box that has text (and does not stop an answer being written: the page's
  // Esc handler leaves an event whose default was prevented alone); an empty box lets it by.
  onKeydown(event) {
    if (event.key === "Enter") {
      event.preventDefault();
      clearTimeout(this.timer);
      if (this.input.value.trim()) this.run();
    } else if (event.key === "Escape" && this.input.value) {
      event.preventDefault();
      this.input.value = "";
      this.clear();
    }
  }

  clear() {
    clearTimeout(this.timer);
    this.asked++; // an answer still on its way is for a query that is gone
    this.list.replaceChildren();
    this.status.textContent = "";
  }

  async run() {
    const q = this.input.value.trim();
    if (!q) return this.clear();
    const asked = ++this.asked;
    this.status.textContent = "Searching…";
    let page;
    try {
      page = await api(`search?q=${encodeURIComponent(q)}&page_size=${PAGE_SIZE}`);
    } catch (err) {
      if (asked !== this.asked) return;
      this.list.replaceChildren();
      this.status.textContent = err instanceof ApiProblem && err.status === 400
        ? `This search was not accepted: ${err.detail || err.code}`
        : `The search failed: ${err.message}`;
      return;
    }
    if (asked !== this.asked) return;
    this.show(page);
  }

  show(page) {
    const hits = (page && page.results) || [];
    const total = page && typeof page.count === "number" ? page.count : hits.length;
    this.list.replaceChildren(...hits.map((hit) => this.item(hit)));
    this.status.textContent = !hits.length ? "No matches."
      : total > hits.length ? `${total} matches; the newest ${hits.length} are shown.`
        : `${total} ${total === 1 ? "match" : "matches"}.`;
    this.setLocked(this.locked);
  }

  item(hit) {
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "search-result";
    button.dataset.testid = "search-result";
    button.dataset.sessionId = hit.session_id;
    if (hit.message_id) button.dataset.messageId = hit.message_id;
    const title = document.createElement("span");
    title.className = "search-title";
    title.textContent = hit.title || this.untitled;
    const snippet = document.createElement("span");
    snippet.className = "search-snippet";
    snippet.textContent = hit.snippet || "";
    button.append(title, snippet);
    button.addEventListener("click", () => this.open(hit));
    li.append(button);
    return li;
  }

  // While an answer streams, another session cannot be opened (as in the session list).
  setLocked(locked) {
    this.locked = locked;
    for (const button of this.list.querySelectorAll(".search-result")) button.disabled = locked;
  }
}
