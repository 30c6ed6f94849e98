// The preference ranking page: prompts → n answers each (one chat completion with `n`) →
// click the answers from best to worst (or pick only the best) → the pairs, in OpenAI's DPO
// format, are appended to this key's preference file in the server's data dir
// (`POST /v1/preferences`), which `GET /v1/preferences` downloads. "Start a DPO job" uploads
// that file (`POST /v1/files`, purpose fine-tune), creates a DPO job on it and links to the
// job's live charts on the fine-tuning page.

import { h } from "./vendor/preact.mjs";
import { useEffect, useState } from "./vendor/hooks.mjs";
import htm from "./vendor/htm.mjs";
import { call, chatModels, post } from "./api.js";
import { baseModels, createJob } from "./tune.js";

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

function Round({ item }) {
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

/** The preference file as it stands → an upload → a DPO job on it. */
function StartDpo({ model }) {
  const [bases, setBases] = useState([]);
  const [base, setBase] = useState("");
  const [beta, setBeta] = useState("0.1");
  const [epochs, setEpochs] = useState("");
  const [batch, setBatch] = useState("");
  const [busy, setBusy] = useState(false);
  const [status, setStatus] = useState(null);
  useEffect(() => {
    baseModels().then((ms) => {
      setBases(ms);
      // The ranked model if it is a base, else the base it adapts.
      const m = ms.find((b) => b.id === model) || ms[0];
      if (m) setBase(m.id);
    }, (e) => setStatus({ error: e.message }));
  }, [model]);
  async function start(e) {
    e.preventDefault();
    setBusy(true);
    setStatus(null);
    try {
      const text = await (await call("GET", "/v1/preferences", undefined, { raw: true })).text();
      const pairs = text.split("\n").filter((l) => l.trim()).length;
      if (!pairs) throw new Error("No pairs yet: rank a round and save it first.");
      const form = new FormData();
      form.append("purpose", "fine-tune");
      form.append("file", new Blob([text], { type: "application/jsonl" }), "preferences.jsonl");
      const file = await call("POST", "/v1/files", form);
      const job = await createJob({ model: base, trainingFile: file.id, method: "dpo", beta, epochs, batch });
      setStatus({ job, pairs });
    } catch (err) {
      setStatus({ error: err.message });
    } finally {
      setBusy(false);
    }
  }
  return html`<section class="start-dpo">
    <h3>Start a DPO job from these preferences</h3>
    <form class="grid" onSubmit=${start}>
      <label>Base model <select value=${base} onChange=${(e) => setBase(e.target.value)}>${bases.map((m) => html`<option value=${m.id}>${m.id}</option>`)}</select></label>
      <label>Beta <input value=${beta} onInput=${(e) => setBeta(e.target.value)} placeholder="auto (0.1)" data-testid="dpo-beta" /></label>
      <label>Epochs <input value=${epochs} onInput=${(e) => setEpochs(e.target.value)} placeholder="auto" data-testid="dpo-epochs" /></label>
      <label>Batch size <input value=${batch} onInput=${(e) => setBatch(e.target.value)} placeholder="auto" data-testid="dpo-batch" /></label>
      <button type="submit" disabled=${busy || !base} data-testid="start-dpo">${busy ? "Starting…" : "Start DPO job"}</button>
    </form>
    <p class="muted">The job trains on every pair this key saved (the file above).</p>
    ${status?.error && html`<p class="error" role="alert" data-testid="dpo-error">${status.error}</p>`}
    ${status?.job && html`<p data-testid="dpo-started">DPO job <a href="#/tune?job=${status.job.id}" data-testid="dpo-job-link">${status.job.id}</a> started on ${status.pairs} pair(s) (${status.job.status}): follow its loss and pair accuracy on the fine-tuning page.</p>`}
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
    ${items.map((it, i) => html`<${Round} key=${i} item=${it} />`)}
    <p><button class="link" onClick=${download} data-testid="rank-download">Download this key's preferences.jsonl</button>
      <span class="muted">(OpenAI's DPO format)</span></p>
    <${StartDpo} model=${model} />
  </main>`;
}
