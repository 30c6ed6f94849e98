// The API client: the one place that knows the signed-in key, the API's error shape and how a
// chat stream (server-sent events) is read. Every page calls the server through it.

const KEY = "ferrolm.key";

export const auth = { key: localStorage.getItem(KEY) || "" };

export function setKey(key) {
  auth.key = key;
  if (key) localStorage.setItem(KEY, key);
  else localStorage.removeItem(KEY);
}

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  if (auth.key) h.Authorization = `Bearer ${auth.key}`;
  return h;
}

/** The error a non-2xx response carries, with the server's own message. */
async function errorOf(r) {
  const text = await r.text().catch(() => "");
  let message = text;
  try {
    const j = JSON.parse(text);
    message = j.error?.message ?? j.error ?? text;
  } catch {
    // not JSON: the text itself
  }
  return new ApiError(r.status, `${r.status} ${r.statusText}: ${message || "no message"}`);
}

/** One API call; JSON in and out unless `raw` (the Response) or a FormData body. */
export async function call(method, path, body, { signal, raw } = {}) {
  const form = body instanceof FormData;
  let r;
  try {
    r = await fetch(path, {
      method,
      headers: headers(body !== undefined && !form),
      body: body === undefined ? undefined : form ? body : JSON.stringify(body),
      signal,
    });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, `the server cannot be reached (${e.message}): is \`ferrolm serve\` running?`);
  }
  if (!r.ok) throw await errorOf(r);
  if (raw) return r;
  return path === "/metrics" ? r.text() : r.json();
}

export const get = (path) => call("GET", path);
export const post = (path, body) => call("POST", path, body ?? {});

/**
 * How long a chat stream may go without a byte before it counts as stalled. The server sends
 * an SSE comment after 15 s of silence (axum's `KeepAlive::default()`, in openai.rs), even
 * while a long prompt is read, so 20 s of nothing means a server that hangs or a connection
 * that died without a close (a dropped network); a killed server closes the connection.
 */
export const STALL_MS = 20_000;

/** `promise`, or `onStall()`'s error after `ms` without it settling. */
function within(promise, ms, onStall) {
  let timer;
  const stall = new Promise((_, reject) => {
    timer = setTimeout(() => reject(onStall()), ms);
  });
  return Promise.race([promise, stall]).finally(() => clearTimeout(timer));
}

/**
 * A streamed chat completion. `onDelta(text)` gets each piece of content as it arrives.
 * Resolves to `{ usage, finish, requestId }` once the server sent `[DONE]`; rejects with an
 * ApiError when the server refuses the request, reports an error mid-stream, the connection
 * ends before `[DONE]` (a server that went away) or nothing arrives for `STALL_MS` (a server
 * that hangs), and with an AbortError on stop.
 */
export async function streamChat(body, { signal, onDelta, stallMs = STALL_MS }) {
  // Our own controller, so that a stall can end the request as Stop does.
  const ctrl = new AbortController();
  const stop = () => ctrl.abort();
  signal?.addEventListener("abort", stop);
  const stalled = (what) => () => {
    // End the request once this error has settled the race (aborting first would settle it
    // with the abort's AbortError, which reads as a stop).
    setTimeout(() => ctrl.abort(), 0);
    return new ApiError(0, `the server sent nothing for ${stallMs / 1000} s ${what}: it may be stalled, or the connection lost; try again`);
  };
  try {
    const r = await within(
      call("POST", "/v1/chat/completions", { ...body, stream: true, stream_options: { include_usage: true } }, { signal: ctrl.signal, raw: true }),
      stallMs,
      stalled("before answering"),
    );
    return await readStream(r, onDelta, stallMs, stalled("mid-reply"));
  } catch (e) {
    // A stop (Esc) is an AbortError whatever the read was doing when it came.
    if (signal?.aborted) throw new DOMException("stopped", "AbortError");
    throw e;
  } finally {
    signal?.removeEventListener("abort", stop);
  }
}

async function readStream(r, onDelta, stallMs, onStall) {
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  let usage = null;
  let finish = null;
  let done = false;
  try {
    for (;;) {
      const { value, done: end } = await within(reader.read(), stallMs, onStall);
      if (end) break;
      buf += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl).replace(/\r$/, "");
        buf = buf.slice(nl + 1);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") {
          done = true;
          continue;
        }
        const ev = JSON.parse(data);
        if (ev.error) throw new ApiError(500, `the server failed mid-reply: ${ev.error.message}`);
        if (ev.usage) usage = ev.usage;
        for (const c of ev.choices || []) {
          if (c.delta?.content) onDelta(c.delta.content);
          if (c.finish_reason) finish = c.finish_reason;
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError" || e instanceof ApiError) throw e;
    throw new ApiError(0, `the connection to the server broke mid-reply (${e.message}): it may have stopped or restarted`);
  } finally {
    reader.cancel().catch(() => {});
  }
  if (!done) {
    throw new ApiError(0, "the server closed the stream before the reply ended: it may have stopped or restarted");
  }
  return { usage, finish, requestId: r.headers.get("x-request-id") };
}

/** The models chat can use (not the embedding model). */
export async function chatModels() {
  const v = await get("/v1/models");
  return v.data.filter((m) => m.type !== "embedding");
}

export const fmt = {
  int: (n) => (n ?? 0).toLocaleString("en-US"),
  // Two significant digits below a cent (local models cost fractions of one), never exponents.
  usd: (n) => (n == null ? "–" : n === 0 ? "$0.00" : `$${n > 0 && n < 0.01 ? n.toFixed(Math.min(12, Math.ceil(-Math.log10(n)) + 1)) : n.toFixed(n < 1 ? 4 : 2)}`),
  pct: (x) => (x == null || !isFinite(x) ? "–" : `${(x * 100).toFixed(1)}%`),
  ms: (n) => (n == null ? "–" : n < 1000 ? `${n.toFixed(0)} ms` : `${(n / 1000).toFixed(2)} s`),
};
