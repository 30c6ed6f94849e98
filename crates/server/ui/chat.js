// The chat page: conversations (IndexedDB), a streamed reply with its usage, stop (Esc),
// regenerate, edit and resend, the sampling settings, and JSONL export / import.

import { h } from "./vendor/preact.mjs";
import { useEffect, useReducer, useRef, useState } from "./vendor/hooks.mjs";
import htm from "./vendor/htm.mjs";
import { ApiError, chatModels, fmt, streamChat } from "./api.js";
import * as db from "./db.js";
import { markdown } from "./markdown.js";

const html = htm.bind(h);

const SETTINGS = "ferrolm.chat-settings";
const DEFAULTS = { temperature: 0.7, top_p: 1, max_tokens: 512, json: false };

function Meta({ m }) {
  if (!m) return null;
  const parts = [];
  if (m.prompt_tokens != null) {
    parts.push(`prompt ${fmt.int(m.prompt_tokens)} (cached ${fmt.int(m.cached_tokens)})`, `completion ${fmt.int(m.completion_tokens)}`);
  }
  if (m.ttft_ms != null) parts.push(`first token ${fmt.ms(m.ttft_ms)}`);
  if (m.tok_s != null) parts.push(`${m.tok_s.toFixed(1)} tok/s`);
  if (m.cost_usd != null) parts.push(`cost ${fmt.usd(m.cost_usd)}`);
  if (m.finish) parts.push(`finish: ${m.finish}`);
  if (m.stopped) parts.push("stopped");
  return html`<div class="meta" data-testid="reply-meta">${parts.join(" · ")}</div>`;
}

function Message({ m, last, busy, onEdit, onRegenerate }) {
  const [editing, setEditing] = useState(false);
  const [text, setText] = useState(m.content);
  if (editing) {
    return html`<div class="msg user editing">
      <textarea value=${text} onInput=${(e) => setText(e.target.value)} rows="4" />
      <div class="actions">
        <button onClick=${() => { setEditing(false); onEdit(text); }} disabled=${busy}>Send</button>
        <button class="link" onClick=${() => setEditing(false)}>Cancel</button>
      </div>
    </div>`;
  }
  return html`<div class="msg ${m.role}" data-testid="msg-${m.role}">
    <div class="role">${m.role === "user" ? "You" : "Model"}</div>
    <div class="body">${m.role === "assistant" ? markdown(m.content) : m.content}</div>
    ${m.meta?.error && html`<p class="error" role="alert" data-testid="chat-error">${m.meta.error}</p>`}
    ${m.role === "assistant" && html`<${Meta} m=${m.meta} />`}
    <div class="actions">
      ${m.role === "user" && !busy && html`<button class="link" onClick=${() => { setText(m.content); setEditing(true); }}>Edit</button>`}
      ${m.role === "assistant" && last && !busy && html`<button class="link" data-testid="regenerate" onClick=${onRegenerate}>Regenerate</button>`}
    </div>
  </div>`;
}

export function Chat({ model, setModel }) {
  const [convs, setConvs] = useState([]);
  const [conv, setConv] = useState(() => db.newConversation());
  const [models, setModels] = useState([]);
  const [modelsError, setModelsError] = useState("");
  const [settings, setSettings] = useState(() => ({ ...DEFAULTS, ...JSON.parse(localStorage.getItem(SETTINGS) || "{}") }));
  const [input, setInput] = useState("");
  const [busy, setBusy] = useState(null);
  const [notice, setNotice] = useState("");
  const [, redraw] = useReducer((x) => x + 1, 0);
  const end = useRef(null);
  const busyRef = useRef(null);
  busyRef.current = busy;

  useEffect(() => {
    db.all().then(setConvs, (e) => setNotice(e.message));
    chatModels().then(
      (ms) => {
        setModels(ms);
        if (!ms.some((m) => m.id === model) && ms.length) setModel(ms[0].id);
      },
      (e) => setModelsError(e.message),
    );
    const esc = (e) => {
      if (e.key === "Escape" && busyRef.current) busyRef.current.abort();
    };
    addEventListener("keydown", esc);
    return () => removeEventListener("keydown", esc);
  }, []);
  useEffect(() => localStorage.setItem(SETTINGS, JSON.stringify(settings)), [settings]);
  useEffect(() => end.current?.scrollIntoView({ block: "end" }));

  async function save(c) {
    c.title = db.titleOf(c.messages);
    await db.put(c);
    setConvs(await db.all());
  }

  async function generate(c) {
    const ctrl = new AbortController();
    setBusy(ctrl);
    setNotice("");
    const messages = (c.system ? [{ role: "system", content: c.system }] : []).concat(
      c.messages.map(({ role, content }) => ({ role, content })),
    );
    const body = {
      model,
      messages,
      temperature: Number(settings.temperature),
      top_p: Number(settings.top_p),
      max_tokens: Number(settings.max_tokens),
    };
    if (settings.json) body.response_format = { type: "json_object" };
    const reply = { role: "assistant", content: "", meta: { model } };
    c.messages.push(reply);
    redraw();
    const t0 = performance.now();
    let first = null;
    try {
      const r = await streamChat(body, {
        signal: ctrl.signal,
        onDelta: (t) => {
          if (first === null) first = performance.now();
          reply.content += t;
          redraw();
        },
      });
      const u = r.usage || {};
      const t1 = performance.now();
      reply.meta = {
        ...reply.meta,
        prompt_tokens: u.prompt_tokens,
        cached_tokens: u.prompt_tokens_details?.cached_tokens ?? 0,
        completion_tokens: u.completion_tokens,
        cost_usd: u.cost_usd,
        ttft_ms: first === null ? null : first - t0,
        tok_s: first !== null && t1 > first && u.completion_tokens > 1 ? (u.completion_tokens - 1) / ((t1 - first) / 1000) : null,
        finish: r.finish,
      };
    } catch (e) {
      if (e.name === "AbortError") reply.meta.stopped = true;
      else reply.meta.error = e instanceof ApiError ? e.message : `${e.name}: ${e.message}`;
    }
    setBusy(null);
    await save(c);
  }

  function send(e) {
    e?.preventDefault();
    const text = input;
    if (!text.trim() || busy) return;
    if (!model) {
      setNotice("Pick a model first.");
      return;
    }
    conv.messages.push({ role: "user", content: text });
    setInput("");
    generate(conv);
  }

  function onKey(e) {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  }

  function regenerate() {
    if (conv.messages.at(-1)?.role === "assistant") conv.messages.pop();
    generate(conv);
  }

  function edit(i, text) {
    conv.messages = conv.messages.slice(0, i);
    conv.messages.push({ role: "user", content: text });
    generate(conv);
  }

  async function exportAll() {
    const blob = new Blob([db.toJsonl(await db.all())], { type: "application/jsonl" });
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = "ferrolm-conversations.jsonl";
    a.click();
    URL.revokeObjectURL(a.href);
  }

  async function importFile(e) {
    const f = e.target.files[0];
    e.target.value = "";
    if (!f) return;
    try {
      const list = db.fromJsonl(await f.text());
      for (const c of list) await db.put(c);
      setConvs(await db.all());
      setNotice(`Imported ${list.length} conversation(s).`);
    } catch (err) {
      setNotice(`${f.name}: ${err.message}`);
    }
  }

  const set = (k) => (e) => setSettings({ ...settings, [k]: e.target.type === "checkbox" ? e.target.checked : e.target.value });

  return html`<main class="chat">
    <aside class="convs">
      <button onClick=${() => !busy && setConv(db.newConversation())} data-testid="new-chat">New chat</button>
      <ul>
        ${convs.map(
          (c) => html`<li class=${c.id === conv.id ? "active" : ""}>
            <a href="#/chat" onClick=${() => !busy && setConv(c)}>${c.title}</a>
            <button class="link" title="Delete" onClick=${async () => { await db.remove(c.id); setConvs(await db.all()); if (c.id === conv.id) setConv(db.newConversation()); }}>×</button>
          </li>`,
        )}
      </ul>
      <div class="io">
        <button class="link" onClick=${exportAll}>Export JSONL</button>
        <label class="link">Import JSONL <input type="file" accept=".jsonl,.json,application/jsonl" onChange=${importFile} hidden /></label>
      </div>
    </aside>
    <section class="thread">
      <div class="messages" data-testid="messages">
        ${conv.messages.length === 0 && html`<p class="muted">Enter sends, Shift+Enter adds a line, Esc stops the reply.</p>`}
        ${conv.messages.map(
          (m, i) => html`<${Message} key=${`${conv.id}-${i}`} m=${m} last=${i === conv.messages.length - 1} busy=${!!busy}
            onEdit=${(t) => edit(i, t)} onRegenerate=${regenerate} />`,
        )}
        <div ref=${end}></div>
      </div>
      ${notice && html`<p class="notice" role="status">${notice}</p>`}
      <form class="composer" onSubmit=${send}>
        <textarea data-testid="prompt" placeholder="Message the model (Enter sends, Shift+Enter: new line)" value=${input} onInput=${(e) => setInput(e.target.value)} onKeyDown=${onKey} rows="3" />
        ${busy
          ? html`<button type="button" data-testid="stop" onClick=${() => busy.abort()}>Stop (Esc)</button>`
          : html`<button type="submit" data-testid="send" disabled=${!input.trim()}>Send</button>`}
      </form>
    </section>
    <aside class="settings">
      <label>Model
        <select data-testid="model" value=${model} onChange=${(e) => setModel(e.target.value)}>
          ${models.map((m) => html`<option value=${m.id}>${m.id}${m.owned_by === "ferrolm-router" ? " (router)" : m.parent ? " (adapter)" : ""}</option>`)}
          ${model && !models.some((m) => m.id === model) && html`<option value=${model}>${model}</option>`}
        </select>
      </label>
      ${modelsError && html`<p class="error">${modelsError}</p>`}
      <label>System prompt <textarea rows="4" value=${conv.system} onInput=${(e) => { conv.system = e.target.value; redraw(); }} /></label>
      <label>Temperature <input type="number" min="0" max="2" step="0.1" value=${settings.temperature} onInput=${set("temperature")} /></label>
      <label>Top p <input type="number" min="0" max="1" step="0.05" value=${settings.top_p} onInput=${set("top_p")} /></label>
      <label>Max tokens <input type="number" min="1" step="1" value=${settings.max_tokens} onInput=${set("max_tokens")} /></label>
      <label class="check"><input type="checkbox" checked=${settings.json} onChange=${set("json")} /> JSON mode</label>
    </aside>
  </main>`;
}
