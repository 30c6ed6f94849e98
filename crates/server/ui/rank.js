// The preference ranking page: prompts → n answers each (one chat completion with `n`) →
// click the answers from best to worst (or pick only the best) → the pairs, in OpenAI's DPO
// format, are appended to this key's preference file in the server's data dir
// (`POST /v1/preferences`), which `GET /v1/preferences` downloads.

import { h } from "./vendor/preact.mjs";
import { useEffect, useState } from "./vendor/hooks.mjs";
import htm from "./vendor/htm.mjs";
import { auth, call, chatModels, post } from "./api.js";

const html = htm.bind(h);

/** Pairs from `order` (answer indexes, best first): each ranked answer over every one below
 * it, ranked or not. */
export function pairsOf(messages, answers, order) {
  const rest = answers.map((_, i) => i).filter((i) => !order.includes(i));
  const below = [...order, ...rest];
  const pairs = [];
  order.forEach((good, r) => {
    for (const worse of below.slice(r + 1)) {
      if (answers[good] === answers[worse]) continue;
      pairs.push({
        input: { messages },
        preferred_output: [{ role: "assistant", content: answers[good] }],
        non_preferred_output: [{ role: "assistant", content: answers[worse] }],
      });
    }
  });
  return pairs;
}

function Round({ item, onSaved }) {
  const [order, setOrder] = useState([]);
  const [status, setStatus] = useState("");
  const pick = (i) => !order.includes(i) && setOrder([...order, i]);
  async function save() {
    const pairs = pairsOf(item.messages, item.answers, order);
    if (!pairs.length) {
      setStatus("Nothing to save: the answers are the same text.");
      return;
    }
    try {
      const r = await post("/v1/preferences", { pairs });
      setStatus(`Appended ${r.appended} pair(s) to ${r.file} (${r.total} in all).`);
      onSaved();
    } catch (e) {
      setStatus(e.message);
    }
  }
  return html`<section class="round" data-testid="round">
    <h4>${item.messages.at(-1).content}</h4>
    <p class="muted">Click the answers from best to worst; one click picks only the best.</p>
    <div class="answers">
      ${item.answers.map(
        (a, i) => html`<button type="button" class="answer ${order.includes(i) ? "ranked" : ""}" data-testid="answer" onClick=${() => pick(i)}>
          ${order.includes(i) && html`<span class="rank">#${order.indexOf(i) + 1}</span>`}
          <span class="text">${a}</span>
        </button>`,
      )}
    </div>
    <div class="row">
      <button onClick=${save} disabled=${!order.length || status.startsWith("Appended")} data-testid="save-pairs">Save pairs</button>
      <button class="link" onClick=${() => { setOrder([]); setStatus(""); }}>Reset</button>
      ${status && html`<span class="muted" data-testid="rank-status">${status}</span>`}
    </div>
  </section>`;
}

export function Rank({ model, setModel }) {
  const [models, setModels] = useState([]);
  const [prompts, setPrompts] = useState("");
  const [system, setSystem] = useState("");
  const [n, setN] = useState(2);
  const [temperature, setTemperature] = useState(1);
  const [maxTokens, setMaxTokens] = useState(128);
  const [items, setItems] = useState([]);
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState("");
  const [saved, setSaved] = useState(0);
  useEffect(() => {
    chatModels().then((ms) => {
      setModels(ms);
      if (!ms.some((m) => m.id === model) && ms.length) setModel(ms[0].id);
    }, (e) => setError(e.message));
  }, []);

  async function generate(e) {
    e.preventDefault();
    const list = prompts.split("\n").map((p) => p.trim()).filter(Boolean);
    setBusy(true);
    setError("");
    setItems([]);
    try {
      const out = [];
      for (const p of list) {
        const messages = (system.trim() ? [{ role: "system", content: system.trim() }] : []).concat([{ role: "user", content: p }]);
        const r = await post("/v1/chat/completions", { model, messages, n: Number(n), temperature: Number(temperature), max_tokens: Number(maxTokens) });
        out.push({ messages, answers: r.choices.map((c) => c.message.content ?? "") });
        setItems([...out]);
      }
    } catch (err) {
      setError(err.message);
    } finally {
      setBusy(false);
    }
  }

  async function download() {
    const r = await call("GET", "/v1/preferences", undefined, { raw: true });
    const a = document.createElement("a");
    a.href = URL.createObjectURL(await r.blob());
    a.download = "preferences.jsonl";
    a.click();
    URL.revokeObjectURL(a.href);
  }

  return html`<main class="page rank">
    <h2>Preference ranking</h2>
    <form class="grid" onSubmit=${generate}>
      <label>Model <select value=${model} onChange=${(e) => setModel(e.target.value)}>${models.map((m) => html`<option value=${m.id}>${m.id}</option>`)}</select></label>
      <label>Answers per prompt <input type="number" min="2" max="8" value=${n} onInput=${(e) => setN(e.target.value)} data-testid="rank-n" /></label>
      <label>Temperature <input type="number" min="0" max="2" step="0.1" value=${temperature} onInput=${(e) => setTemperature(e.target.value)} /></label>
      <label>Max tokens <input type="number" min="1" value=${maxTokens} onInput=${(e) => setMaxTokens(e.target.value)} data-testid="rank-max-tokens" /></label>
      <label class="wide">System prompt (optional) <input value=${system} onInput=${(e) => setSystem(e.target.value)} /></label>
      <label class="wide">Prompts, one per line <textarea rows="4" value=${prompts} onInput=${(e) => setPrompts(e.target.value)} data-testid="rank-prompts" /></label>
      <button type="submit" disabled=${busy || !prompts.trim()} data-testid="rank-generate">${busy ? "Generating…" : "Generate answers"}</button>
    </form>
    ${error && html`<p class="error" role="alert">${error}</p>`}
    ${items.map((it, i) => html`<${Round} key=${i} item=${it} onSaved=${() => setSaved(saved + 1)} />`)}
    <p><button class="link" onClick=${download} data-testid="rank-download">Download this key's preferences.jsonl</button>
      <span class="muted">(OpenAI's DPO format; upload it on the fine-tuning page once the server trains DPO)</span></p>
  </main>`;
}
