// Pantheon's JSON API as the chat page and the keys panel call it: the browser session's
// cookie, the CSRF token on writes, a typed error for a refused request.

const app = document.getElementById("app");
export const API = (app && app.dataset.apiBase) || "/api/v1";

export function csrfToken() {
  for (const part of document.cookie.split(";")) {
    const [name, ...rest] = part.trim().split("=");
    if (name === "csrftoken") return decodeURIComponent(rest.join("="));
  }
  const input = document.querySelector("input[name=csrfmiddlewaretoken]");
  return input ? input.value : "";
}

// A refused request: its status, and the body's `code` and `detail` when it had them.
export class ApiProblem extends Error {
  constructor(status, body) {
    super((body && body.detail) || `HTTP ${status}`);
    this.status = status;
    this.code = (body && typeof body.code === "string" && body.code) || "";
    this.detail = (body && typeof body.detail === "string" && body.detail) || "";
  }
}

// `path` is absolute ("/api/v1/...") or relative to API; the parsed body (null for 204).
export async function api(path, { method = "GET", body } = {}) {
  const headers = { Accept: "application/json" };
  if (method !== "GET") headers["X-CSRFToken"] = csrfToken();
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path.startsWith("/") ? path : `${API}/${path}`, {
    method,
    headers,
    credentials: "same-origin",
    cache: "no-store",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  if (response.status !== 204) {
    try {
      data = await response.json();
    } catch {
      data = null;
    }
  }
  if (!response.ok) throw new ApiProblem(response.status, data);
  return data;
}

// Every item of a paginated list, following `next` (kept same-origin) a bounded number of times.
export async function allPages(path, maxPages = 20) {
  const items = [];
  let url = `${API}/${path}${path.includes("?") ? "&" : "?"}page_size=200`;
  for (let page = 0; url && page < maxPages; page++) {
    const data = await api(url);
    items.push(...((data && data.results) || []));
    if (!data || !data.next) break;
    const next = new URL(data.next, window.location.href);
    url = next.pathname + next.search;
  }
  return items;
}
