// The server page: models and adapters (`/v1/models`), and the engine's state from `/metrics`
// (Prometheus text): KV-cache use, queue, prefix-cache hit rate and throughput, polled.

import { h } from "./vendor/preact.mjs";
import { useEffect, useRef, useState } from "./vendor/hooks.mjs";
import htm from "./vendor/htm.mjs";
import { fmt, get } from "./api.js";

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
    <p class="muted">The API has no key administration: keys are created (with limits) and revoked on the server with <code>ferrolm keys create|list|revoke --data-dir DIR</code>.</p>
  </main>`;
}
