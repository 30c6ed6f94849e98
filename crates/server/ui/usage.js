// The usage and cost page: the ledger (`GET /v1/usage`) for the signed-in key (every key's
// requests for an admin key and on an open server), by day, model and key, with what caching,
// compression and routing saved, and what the same traffic would cost on the catalog's hosted
// models.

import { h } from "./vendor/preact.mjs";
import { useEffect, useState } from "./vendor/hooks.mjs";
import htm from "./vendor/htm.mjs";
import { fmt, get } from "./api.js";
import { BarChart } from "./charts.js";

const html = htm.bind(h);

const share = (r) => (r.prompt_tokens ? r.cached_tokens / r.prompt_tokens : null);
const saved = (r) => r.saved_by_cache_usd + r.saved_by_compression_usd + r.saved_by_routing_usd + r.saved_by_lazy_tools_usd;

function Table({ rows, by, testid }) {
  return html`<table data-testid=${testid}>
    <thead><tr><th>${by}</th><th>requests</th><th>prompt</th><th>cached</th><th>completion</th><th>cost</th><th>saved</th><th>latency p50 / p95 (avg)</th><th>avg first token</th></tr></thead>
    <tbody>
      ${rows.map(
        (r) => html`<tr>
          <td>${r[by] || "(none: refused before a model was chosen)"}</td><td>${fmt.int(r.requests)}</td><td>${fmt.int(r.prompt_tokens)}</td>
          <td>${fmt.int(r.cached_tokens)} (${fmt.pct(share(r))})</td><td>${fmt.int(r.completion_tokens)}</td>
          <td>${fmt.usd(r.cost_usd)}</td><td>${fmt.usd(saved(r))}</td><td>${fmt.ms(r.p50_latency_ms)} / ${fmt.ms(r.p95_latency_ms)} (${fmt.ms(r.avg_latency_ms)})</td><td>${fmt.ms(r.avg_ttft_ms)}</td>
        </tr>`,
      )}
    </tbody>
  </table>`;
}

export function Usage() {
  const [data, setData] = useState(null);
  const [error, setError] = useState("");
  const [days, setDays] = useState(30);

  async function load() {
    try {
      const since = Math.floor(Date.now() / 1000) - days * 86400;
      const q = (by) => get(`/v1/usage?by=${by}&since=${since}`);
      const [total, day, model, key] = (await Promise.all([q(""), q("day"), q("model"), q("key")]));
      setData({
        total: total.data[0],
        hosted: total.hosted || [],
        day: day.data.sort((a, b) => (a.day < b.day ? -1 : 1)),
        model: model.data,
        key: key.data,
      });
      setError("");
    } catch (e) {
      setError(e.message);
    }
  }
  useEffect(() => {
    load();
  }, [days]);

  if (error) return html`<main class="page"><p class="error" role="alert">${error}</p></main>`;
  if (!data) return html`<main class="page"><p class="muted">Loading the ledger…</p></main>`;
  const t = data.total || { requests: 0, prompt_tokens: 0, cached_tokens: 0, completion_tokens: 0, cost_usd: 0 };
  const card = (label, value, id) => html`<div class="card"><div class="label">${label}</div><div class="value" data-testid=${id}>${value}</div></div>`;
  return html`<main class="page usage">
    <div class="toolbar">
      <h2>Usage & cost</h2>
      <label>Last <select value=${days} onChange=${(e) => setDays(Number(e.target.value))}>
        ${[1, 7, 30, 90, 365].map((d) => html`<option value=${d}>${d} day${d > 1 ? "s" : ""}</option>`)}
      </select></label>
      <button onClick=${load} data-testid="usage-refresh">Refresh</button>
    </div>
    <div class="cards">
      ${card("Requests", fmt.int(t.requests), "usage-requests")}
      ${card("Prompt tokens", fmt.int(t.prompt_tokens), "usage-prompt")}
      ${card("Cached share", fmt.pct(share(t)), "usage-cached")}
      ${card("Completion tokens", fmt.int(t.completion_tokens), "usage-completion")}
      ${card("Cost", fmt.usd(t.cost_usd), "usage-cost")}
      ${card("Latency p50 / p95", `${fmt.ms(t.p50_latency_ms)} / ${fmt.ms(t.p95_latency_ms)}`, "usage-latency")}
    </div>
    <h3>What the server saved</h3>
    <div class="cards">
      ${card("Prefix cache", fmt.usd(t.saved_by_cache_usd), "saved-cache")}
      ${card("Compression", fmt.usd(t.saved_by_compression_usd), "saved-compression")}
      ${card("Routing", fmt.usd(t.saved_by_routing_usd), "saved-routing")}
      ${card("Lazy tools", fmt.usd(t.saved_by_lazy_tools_usd), "saved-tools")}
    </div>
    <div class="charts">
      <${BarChart} title="Cost per day" data=${data.day.map((r) => ({ label: r.day, value: r.cost_usd }))} format=${fmt.usd} />
      <${BarChart} title="Tokens per day" data=${data.day.map((r) => ({ label: r.day, value: r.prompt_tokens + r.completion_tokens }))} format=${(v) => fmt.int(Math.round(v))} />
    </div>
    <h3>The same traffic on hosted models</h3>
    ${data.hosted.length
      ? html`<table data-testid="usage-hosted">
          <thead><tr><th>model</th><th>provider</th><th>cost</th><th>× yours</th><th>prices as of</th></tr></thead>
          <tbody>${data.hosted.map(
            (m) => html`<tr><td>${m.model}</td><td>${m.provider}</td><td>${fmt.usd(m.cost_usd)}</td>
              <td>${t.cost_usd > 0 ? `${(m.cost_usd / t.cost_usd).toFixed(1)}×` : "–"}</td><td>${m.as_of}</td></tr>`,
          )}</tbody>
        </table>
        <p class="muted">List prices from the server's price catalog, at base rates (long-prompt tiers are per request and not applied here).</p>`
      : html`<p class="muted">The server's price catalog has no hosted models.</p>`}
    <h3>By model</h3>
    <${Table} rows=${data.model} by="model" testid="usage-by-model" />
    <h3>By key</h3>
    <${Table} rows=${data.key} by="key" testid="usage-by-key" />
    <h3>By day</h3>
    <${Table} rows=${data.day} by="day" testid="usage-by-day" />
    <p class="muted">From the server's ledger: your key's requests (every key's for an admin key, every request on a server without keys). Latency percentiles are nearest-rank.</p>
  </main>`;
}
