// Assistant answers as Markdown, safely (an ES module, no build step). docs/chat-page.md.
//
//   renderMarkdown(text)           -> a DocumentFragment of the whole answer (history)
//   new MarkdownStream(el)         -> .append(delta) while it streams, .finish() at its end
//   installCopyButtons(container)  -> the code blocks' copy buttons work inside `container`
//
// The order is the one that is safe: markdown-it parses the text with `html: false` (raw HTML
// in the answer is shown as text), its HTML goes through DOMPurify (a whitelist of the tags
// and attributes markdown-it makes; links only to http(s) and mailto, opened in a new tab
// with rel="noopener noreferrer"), and only DOMPurify's output (DOM nodes, never a string)
// is inserted. highlight.js colours a fenced code block once its closing fence has arrived.
// The page's Content-Security-Policy (no inline script, no inline style) backs this up.
//
// While an answer streams it is rendered at most once per animation frame and at most
// every MIN_INTERVAL_MS; top-level blocks that are complete (another block follows them)
// are rendered once and kept, and only the open block at the end is parsed and rendered
// again, so a long answer costs the same per frame as a short one.

import markdownit from "./vendor/markdown-it.min.js";
import DOMPurify from "./vendor/purify.es.js";
import hljs from "./vendor/highlight.min.js";

const MIN_INTERVAL_MS = 50;

// What the renders cost (docs/chat-page.md's figure): their count and milliseconds, the
// answers rendered whole, the blocks rendered for good; `samples` (each render's ms) only
// once a measurement sets it to an array.
export const renderStats = { renders: 0, ms: 0, maxMs: 0, fullRenders: 0, frozenBlocks: 0, samples: null };

// --- parse -----------------------------------------------------------------------------

const md = markdownit({ html: false, linkify: true, typographer: false, breaks: true });
const { escapeHtml, unescapeAll } = md.utils;

// Links (and images) only to the web and to mail: anything else stays text as written.
md.validateLink = (url) => /^(?:https?:|mailto:)/.test(url.trim().toLowerCase());

// A table column's alignment as a class: an inline style would be refused by the page's CSP.
md.core.ruler.push("pantheon_align_class", (state) => {
  for (const token of state.tokens) {
    if (token.type !== "th_open" && token.type !== "td_open") continue;
    const style = token.attrGet("style") || "";
    if (!style) continue;
    token.attrs = token.attrs.filter(([name]) => name !== "style");
    const align = /text-align:(left|right|center)/.exec(style);
    if (align) token.attrJoin("class", `align-${align[1]}`);
  }
});

// An image from the answer is not loaded (it would tell a third party that the answer was
// read, and the CSP allows no outside image): it becomes a link to it.
md.renderer.rules.image = (tokens, idx, options, env, self) => {
  const token = tokens[idx];
  const alt = self.renderInlineAsText(token.children, options, env);
  const src = token.attrGet("src") || "";
  const title = token.attrGet("title");
  return `<a href="${escapeHtml(src)}" class="md-image"${title ? ` title="${escapeHtml(title)}"` : ""}>`
    + `${escapeHtml(`Image: ${alt || src}`)}</a>`;
};

// A fenced block: highlighted when its fence has closed (token.meta.open is set on the one
// still streaming), else plain escaped text.
md.renderer.rules.fence = (tokens, idx) => {
  const token = tokens[idx];
  const info = token.info ? unescapeAll(token.info).trim() : "";
  const lang = (info.split(/\s+/)[0] || "").toLowerCase();
  const open = Boolean(token.meta && token.meta.open);
  const classes = [];
  if (/^[\w+#.-]{1,40}$/.test(lang)) classes.push(`language-${lang}`);
  let body = null;
  if (!open) {
    body = highlight(token.content, lang);
    if (body !== null) classes.push("hljs");
  } else {
    classes.push("code-open");
  }
  const attr = classes.length ? ` class="${escapeHtml(classes.join(" "))}"` : "";
  return `<pre><code${attr}>${body !== null ? body : escapeHtml(token.content)}</code></pre>\n`;
};

// A language highlight.js knows; a fence without one (or with another) stays plain: guessing
// colours prose and costs a pass per language.
function highlight(code, lang) {
  if (!lang || !hljs.getLanguage(lang)) return null;
  try {
    return hljs.highlight(code, { language: lang, ignoreIllegals: true }).value;
  } catch {
    return null;
  }
}

// --- sanitize --------------------------------------------------------------------------

// Exactly what markdown-it (and highlight.js's spans) make; nothing else survives.
const SANITIZE = {
  ALLOWED_TAGS: ["a", "blockquote", "br", "code", "del", "em", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "li",
    "ol", "p", "pre", "s", "span", "strong", "table", "tbody", "td", "th", "thead", "tr", "ul"],
  ALLOWED_ATTR: ["href", "title", "class", "start"],
  ALLOWED_URI_REGEXP: /^(?:https?|mailto):/i,
  ALLOW_DATA_ATTR: false,
  ALLOW_ARIA_ATTR: false,
  RETURN_DOM_FRAGMENT: true,
};
// Classes from highlight.js ("hljs-keyword", "function_"), fences and table alignment only:
// an answer cannot borrow the page's own classes.
const SAFE_CLASS = /^(?:hljs(?:-[\w-]+)?|[a-z]+_+|language-[\w+#.-]{1,40}|align-(?:left|right|center)|code-open|md-image)$/;

const purify = DOMPurify(window); // our own instance: its hooks touch nothing else
purify.setConfig(SANITIZE);
purify.addHook("uponSanitizeAttribute", (node, data) => {
  if (data.attrName === "class") {
    data.attrValue = data.attrValue.split(/\s+/).filter((name) => SAFE_CLASS.test(name)).join(" ");
    if (!data.attrValue) data.keepAttr = false;
  }
});
purify.addHook("afterSanitizeAttributes", (node) => {
  if (node.nodeName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

// markdown-it's HTML -> sanitized DOM nodes, with a copy button on each finished code block.
function toFragment(html) {
  const fragment = purify.sanitize(html); // with SANITIZE (setConfig below)
  for (const node of Array.from(fragment.childNodes)) {
    if (node.nodeType === Node.TEXT_NODE && !node.data.trim()) node.remove(); // "\n" between blocks
  }
  for (const pre of fragment.querySelectorAll("pre")) decorateCode(pre);
  return fragment;
}

function decorateCode(pre) {
  const code = pre.querySelector("code");
  if (!code || code.classList.contains("code-open")) return; // still streaming: no button yet
  const lang = Array.from(code.classList).find((name) => name.startsWith("language-"));
  const block = document.createElement("div");
  block.className = "code-block";
  const bar = document.createElement("div");
  bar.className = "code-bar";
  const label = document.createElement("span");
  label.className = "code-lang";
  label.textContent = lang ? lang.slice("language-".length) : "";
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "code-copy";
  copy.dataset.testid = "code-copy";
  copy.setAttribute("aria-label", "Copy code");
  bar.append(label, copy);
  pre.replaceWith(block);
  block.append(bar, pre);
}

// --- render ----------------------------------------------------------------------------

function timed(fn) {
  const started = performance.now();
  try {
    return fn();
  } finally {
    const ms = performance.now() - started;
    renderStats.renders += 1;
    renderStats.ms += ms;
    renderStats.maxMs = Math.max(renderStats.maxMs, ms);
    if (renderStats.samples) renderStats.samples.push(ms); // kept only when a measurement asks
  }
}

export function renderMarkdown(text) {
  return timed(() => {
    renderStats.fullRenders += 1;
    return toFragment(md.render(String(text)));
  });
}

// A reference definition ("[1]: https://...") may come after the links that use it: an
// answer with one is rendered whole again at its end.
const REFERENCE_DEFINITION = /^ {0,3}\[[^\]]+\]:/m;
const CLOSING_FENCE = /^[ \t>]*(`{3,}|~{3,})[ \t]*$/;

// The top-level blocks of a token list: [{start, end, line, endLine}] (token indexes; the
// source lines [line, endLine) they were parsed from).
function topBlocks(tokens) {
  const blocks = [];
  let depth = 0;
  let start = 0;
  for (let i = 0; i < tokens.length; i++) {
    if (depth === 0) start = i;
    depth += tokens[i].nesting;
    if (depth === 0) {
      const map = tokens[start].map || [0, 0];
      blocks.push({ start, end: i + 1, line: map[0], endLine: map[1] });
    }
  }
  return blocks;
}

// The offset in `text` of the start of line `line` (markdown-it's line breaks: CRLF, CR, LF).
function lineOffset(text, line) {
  const breaks = /\r\n?|\n/g;
  for (let n = 0; n < line; n++) {
    if (!breaks.exec(text)) return text.length;
  }
  return line === 0 ? 0 : breaks.lastIndex;
}

// In the open block, a fence is closed once its closing fence line is complete (a line
// break follows it); until then it is shown as plain text, without a copy button. Says
// whether one is still open.
function markOpenFences(tokens, lines, lineCount) {
  let anyOpen = false;
  for (const token of tokens) {
    if (token.type !== "fence" || !token.map) continue;
    const last = token.map[1] - 1;
    const closing = last > token.map[0] && last < lineCount ? CLOSING_FENCE.exec(lines[last]) : null;
    const closed = closing && closing[1][0] === token.markup[0] && closing[1].length >= token.markup.length;
    token.meta = { ...(token.meta || {}), open: !closed };
    anyOpen = anyOpen || !closed;
  }
  return anyOpen;
}

export class MarkdownStream {
  constructor(el, { onRender } = {}) {
    this.el = el;
    this.onRender = onRender || null;
    this.source = "";
    this.tailStart = 0; // where the open block begins in `source`; what is before it is rendered for good
    this.tailNodes = []; // the open block's nodes in `el`
    this.tailShown = null; // the text from tailStart as last rendered
    this.tailBlock = null; // the lines of the open block as last rendered, if they can be kept
    this.env = {}; // markdown-it's env, kept: reference definitions seen so far
    this.pending = null; // {timer} or {frame} while a render is scheduled
    this.lastRender = -Infinity;
    this.finished = false;
  }

  get text() {
    return this.source;
  }

  append(delta) {
    if (!delta || this.finished) return;
    this.source += delta;
    this.schedule();
  }

  // At most one render per animation frame, and at most every MIN_INTERVAL_MS.
  schedule() {
    if (this.pending) return;
    const wait = this.lastRender + MIN_INTERVAL_MS - performance.now();
    const onFrame = () => {
      this.pending = { frame: requestAnimationFrame(() => this.renderNow()) };
    };
    if (wait > 0) this.pending = { timer: setTimeout(onFrame, wait) };
    else onFrame();
  }

  cancel() {
    if (!this.pending) return;
    if (this.pending.timer) clearTimeout(this.pending.timer);
    if (this.pending.frame) cancelAnimationFrame(this.pending.frame);
    this.pending = null;
  }

  renderNow() {
    this.cancel();
    this.lastRender = performance.now();
    timed(() => this.renderTail(false));
    if (this.onRender) this.onRender();
  }

  // The answer is complete: its last block is rendered for good (a fence left open is closed
  // by the end of the answer, so it is highlighted too).
  finish() {
    if (this.finished) return;
    this.cancel();
    this.finished = true;
    timed(() => {
      if (REFERENCE_DEFINITION.test(this.source)) {
        renderStats.fullRenders += 1;
        this.el.replaceChildren(toFragment(md.render(this.source)));
        this.tailNodes = [];
        this.tailBlock = null;
      } else {
        this.renderTail(true);
      }
    });
    if (this.onRender) this.onRender();
  }

  renderTail(final) {
    const tail = this.source.slice(this.tailStart);
    if (!final && tail === this.tailShown) return;
    const tokens = md.parse(tail, this.env);
    const blocks = topBlocks(tokens);
    const complete = final ? blocks.length : Math.max(blocks.length - 1, 0);
    // The open block of the last render, now complete with the same lines (and no fence
    // left open in it): its nodes are kept as they are, not rendered again.
    let first = 0;
    if (complete > 0 && this.tailBlock !== null && blocks[0].line === 0
        && tail.slice(0, lineOffset(tail, blocks[0].endLine)) === this.tailBlock) first = 1;
    if (first === 0) for (const node of this.tailNodes) node.remove();
    this.tailNodes = [];
    this.tailBlock = null;
    if (complete > first) {
      // Every fence in these blocks has closed (another block follows them, or the answer ended).
      const done = tokens.slice(blocks[first].start, blocks[complete - 1].end);
      this.el.append(toFragment(md.renderer.render(done, md.options, this.env)));
      renderStats.frozenBlocks += complete - first;
    }
    if (final) {
      this.tailStart = this.source.length;
      this.tailShown = "";
    } else if (blocks.length) {
      const open = blocks[blocks.length - 1];
      const openTokens = tokens.slice(open.start, open.end);
      const lines = tail.split(/\r\n?|\n/);
      const hasOpenFence = markOpenFences(openTokens, lines, lines.length - 1); // the last line is not complete yet
      const fragment = toFragment(md.renderer.render(openTokens, md.options, this.env));
      this.tailNodes = Array.from(fragment.childNodes);
      this.el.append(fragment);
      const start = lineOffset(tail, open.line);
      if (!hasOpenFence) this.tailBlock = tail.slice(start, lineOffset(tail, open.endLine));
      this.tailStart += start;
      this.tailShown = this.source.slice(this.tailStart);
    } else {
      this.tailShown = tail; // blank lines, or a reference definition: nothing to show yet
    }
  }
}

// --- copy buttons ----------------------------------------------------------------------

async function copyText(text, code) {
  try {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      return true;
    }
  } catch {
    // fall back to a selection below
  }
  const range = document.createRange();
  range.selectNodeContents(code);
  const selection = window.getSelection();
  selection.removeAllRanges();
  selection.addRange(range);
  try {
    return document.execCommand("copy");
  } catch {
    return false;
  }
}

// One listener for every code block in `container`, those rendered later included.
export function installCopyButtons(container) {
  container.addEventListener("click", async (event) => {
    const button = event.target instanceof Element ? event.target.closest(".code-copy") : null;
    if (!button || !container.contains(button)) return;
    const code = button.closest(".code-block")?.querySelector("pre code");
    if (!code) return;
    const copied = await copyText(code.textContent, code);
    button.dataset.state = copied ? "copied" : "failed";
    button.setAttribute("aria-label", copied ? "Copied" : "Could not copy: the code is selected, press Ctrl+C");
    clearTimeout(button.resetTimer);
    button.resetTimer = setTimeout(() => {
      delete button.dataset.state;
      button.setAttribute("aria-label", "Copy code");
    }, 2000);
  });
}
