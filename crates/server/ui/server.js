// The server page: models and adapters (`/v1/models`), and the engine's state from `/metrics`
// (Prometheus text): KV-cache use, queue, prefix-cache hit rate and throughput, polled. For an
// admin key, the keys (`/v1/keys`): create with limits (the secret is shown once), revoke, and
// usage per key (`/v1/usage?by=key`, which covers every key for an admin); any other caller
// sees the server's 403, which says how to get an admin key.

import { h } from "./vendor/preact.mjs";
import { useEffect, useRef, useState } from "./vendor/hooks.mjs";
import htm from "./vendor/htm.mjs";
import { call, fmt, get, post } from "./api.js";

const html = htm.bind(h);

/** `name{labels} value` lines → { name: [{ labels, value }] }. */
export function parseMetrics(text) {
  const out = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][\w:]*)(\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    for (const [, k, v] of (m[3] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[k] = v;
    (out[m[1]] ||= []).push({ labels, value: Number(m[4]) });
  }
  return out;
}

/** Keys: the list with limits, spend and usage; a create form; revoke. */
function Keys() {
  const [keys, setKeys] = useState(null);
  const [usage, setUsage] = useState({});
  const [error, setError] = useState("");
  const [created, setCreated] = useState(null);
  const [formError, setFormError] = useState("");
  async function load() {
    try {
      const [k, u] = await Promise.all([get("/v1/keys"), get("/v1/usage?by=key")]);
      setKeys(k.data);
      setUsage(Object.fromEntries(u.data.map((g) => [g.key, g])));
      setError("");
    } catch (e) {
      setError(e.message);
    }
  }
  useEffect(() => {
    load();
  }, []);
  async function create(e) {
    e.preventDefault();
    const f = e.target.elements;
    const opt = (v) => (v.trim() === "" ? undefined : Number(v));
    setFormError("");
    try {
      const k = await post("/v1/keys", { name: f.name.value.trim(), rpm: opt(f.rpm.value), tpm: opt(f.tpm.value), budget_usd: opt(f.budget.value), admin: f.admin.checked });
      setCreated(k);
      e.target.reset();
      load();
    } catch (err) {
      setFormError(err.message);
    }
  }
  async function revoke(k) {
    try {
      await call("DELETE", `/v1/keys/${k.id}`);
      load();
    } catch (e) {
      setError(e.message);
    }
  }
  if (error && !keys) return html`<p class="error" role="alert" data-testid="keys-error">${error}</p>`;
  if (!keys) return html`<p class="muted">Loading the keys…</p>`;
  const limit = (v, f = fmt.int) => (v == null ? "–" : f(v));
  return html`<div>
    ${error && html`<p class="error" role="alert">${error}</p>`}
    <table data-testid="keys">
      <thead><tr><th>id</th><th>name</th><th>prefix</th><th>rpm</th><th>tpm</th><th>budget</th><th>spent</th><th>requests</th><th>tokens</th><th>status</th><th></th></tr></thead>
      <tbody>${keys.map((k) => {
        const u = usage[k.name];
        return html`<tr data-testid="key-row" data-name=${k.name}>
          <td>${k.id}</td><td>${k.name}${k.admin ? " (admin)" : ""}</td><td><code>${k.prefix}…</code></td>
          <td>${limit(k.rpm)}</td><td>${limit(k.tpm)}</td><td>${limit(k.budget_usd, fmt.usd)}</td><td>${fmt.usd(k.spent_usd)}</td>
          <td>${fmt.int(u?.requests)}</td><td>${fmt.int((u?.prompt_tokens ?? 0) + (u?.completion_tokens ?? 0))}</td>
          <td class="key-status">${k.active ? "active" : `revoked ${new Date(k.revoked * 1000).toLocaleString()}`}</td>
          <td>${k.active && html`<button class="danger" data-testid="revoke" onClick=${() => revoke(k)}>Revoke</button>`}</td>
        </tr>`;
      })}</tbody>
    </table>
    <h4>New key</h4>
    <form class="grid" onSubmit=${create}>
      <label>Name <input name="name" placeholder="letters, digits, . _ -" data-testid="key-name" /></label>
      <label>Requests / min <input name="rpm" type="number" min="1" placeholder="no limit" data-testid="key-rpm" /></label>
      <label>Tokens / min <input name="tpm" type="number" min="1" placeholder="no limit" /></label>
      <label>Budget (USD) <input name="budget" type="number" min="0" step="any" placeholder="no budget" data-testid="key-budget" /></label>
      <label class="check"><input name="admin" type="checkbox" /> admin (may manage keys)</label>
      <button type="submit" data-testid="create-key">Create key</button>
    </form>
    ${formError && html`<p class="error" role="alert" data-testid="key-error">${formError}</p>`}
    ${created && html`<p class="notice" data-testid="key-created">Key <strong>${created.name}</strong> (id ${created.id}) — its secret, shown this once: <code data-testid="key-secret">${created.secret}</code></p>`}
  </div>`;
}

const sum = (ms, name) => (ms[name] || []).reduce((a, s) => a + s.value, 0);

export function Server() {
  const [models, setModels] = useState([]);
  const [metrics, setMetrics] = useState(null);
  const [rate, setRate] = useState(null);
  const [error, setError] = useState("");
  const prev = useRef(null);

  useEffect(() => {
    get("/v1/models").then((v) => setModels(v.data), (e) => setError(e.message));
    let stop = false;
    async function poll() {
      try {
        const ms = parseMetrics(await get("/metrics"));
        const now = performance.now();
        const tokens = sum(ms, "ferrolm_completion_tokens_total");
        if (prev.current) {
          const dt = (now - prev.current.t) / 1000;
          setRate(dt > 0 ? (tokens - prev.current.tokens) / dt : null);
        }
        prev.current = { t: now, tokens };
        setMetrics(ms);
        setError("");
      } catch (e) {
        setError(e.message);
      }
      if (!stop) setTimeout(poll, 2000);
    }
    poll();
    return () => {
      stop = true;
    };
  }, []);

  const card = (label, value, id) => html`<div class="card"><div class="label">${label}</div><div class="value" data-testid=${id}>${value}</div></div>`;
  const ms = metrics || {};
  const used = sum(ms, "ferrolm_kv_blocks_used");
  const free = sum(ms, "ferrolm_kv_blocks_free");
  const kvShare = used + free ? used / (used + free) : null;
  const hit = ms.ferrolm_prefix_cache_hit_rate ? sum(ms, "ferrolm_prefix_cache_hit_rate") / ms.ferrolm_prefix_cache_hit_rate.length : null;
  const routes = (ms.ferrolm_requests_total || []).slice().sort((a, b) => b.value - a.value);
  return html`<main class="page server">
    <h2>Server</h2>
    ${error && html`<p class="error" role="alert">${error}</p>`}
    <div class="cards">
      ${card("KV cache used", html`${fmt.pct(kvShare)} <small>${fmt.int(used)} / ${fmt.int(used + free)} blocks</small>`, "kv-used")}
      ${card("KV bytes", `${(sum(ms, "ferrolm_kv_bytes_used") / 2 ** 20).toFixed(1)} / ${(sum(ms, "ferrolm_kv_bytes_capacity") / 2 ** 20).toFixed(1)} MiB`, "kv-bytes")}
      ${card("Running", fmt.int(sum(ms, "ferrolm_requests_running")), "running")}
      ${card("Waiting", fmt.int(sum(ms, "ferrolm_requests_waiting")), "waiting")}
      ${card("Prefix-cache hit rate", fmt.pct(hit), "hit-rate")}
      ${card("Throughput", rate == null ? "–" : `${rate.toFixed(1)} tok/s`, "throughput")}
      ${card("Generations", fmt.int(sum(ms, "ferrolm_generations_total")), "generations")}
      ${card("Tokens (prompt / completion)", `${fmt.int(sum(ms, "ferrolm_prompt_tokens_total"))} / ${fmt.int(sum(ms, "ferrolm_completion_tokens_total"))}`, "tokens")}
    </div>
    <h3>Models</h3>
    <table data-testid="server-models">
      <thead><tr><th>id</th><th>kind</th><th>details</th></tr></thead>
      <tbody>${models.map(
        (m) => html`<tr><td>${m.id}</td><td>${m.type === "embedding" ? "embedding" : m.owned_by === "ferrolm-router" ? "router" : m.parent ? "adapter" : "model"}</td>
          <td>${m.parent ? `on ${m.parent}` : m.quantization ? m.quantization.type : m.dimensions ? `${m.dimensions} dims` : ""}</td></tr>`,
      )}</tbody>
    </table>
    <h3>Requests by route</h3>
    <table>
      <thead><tr><th>route</th><th>status</th><th>count</th></tr></thead>
      <tbody>${routes.map((r) => html`<tr><td>${r.labels.route}</td><td>${r.labels.status}</td><td>${fmt.int(r.value)}</td></tr>`)}</tbody>
    </table>
    <h3>Keys</h3>
    <${Keys} />
  </main>`;
}
