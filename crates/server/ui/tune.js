// The fine-tuning page: upload a chat or preference JSONL (the server validates it and names
// a bad line), create a job (supervised or DPO) with its hyperparameters, follow it (job,
// events and checkpoints, polled): the loss chart, and for DPO the pair-accuracy chart, fill
// from its metrics events; cancel, pause, resume; chat with the result. `#/tune?job=ID` opens
// a job (the ranking page links its DPO jobs so).

import { h } from "./vendor/preact.mjs";
import { useEffect, useRef, useState } from "./vendor/hooks.mjs";
import htm from "./vendor/htm.mjs";
import { call, chatModels, fmt, get, post } from "./api.js";
import { LineChart } from "./charts.js";

const html = htm.bind(h);
const FINAL = ["succeeded", "failed", "cancelled"];
const POLL_MS = 1000;

function Upload({ onUploaded }) {
  const [error, setError] = useState("");
  const [busy, setBusy] = useState(false);
  async function upload(e) {
    e.preventDefault();
    const file = e.target.elements.file.files[0];
    if (!file) return;
    const form = new FormData();
    form.append("purpose", "fine-tune");
    form.append("file", file, file.name);
    setBusy(true);
    setError("");
    try {
      const f = await call("POST", "/v1/files", form);
      e.target.reset();
      onUploaded(f);
    } catch (err) {
      setError(`${file.name}: ${err.message}`);
    } finally {
      setBusy(false);
    }
  }
  return html`<form class="row" onSubmit=${upload}>
    <input type="file" name="file" accept=".jsonl,application/jsonl" data-testid="upload-file" />
    <button type="submit" disabled=${busy} data-testid="upload">Upload</button>
    ${error && html`<p class="error" role="alert" data-testid="upload-error">${error}</p>`}
  </form>`;
}

/** The models a job can start from: served base models (not adapters or routers). */
export async function baseModels() {
  return (await chatModels()).filter((m) => !m.parent && m.owned_by !== "ferrolm-router");
}

/** A form field's number, or "auto" when it is empty. */
const num = (v) => (String(v).trim() === "" ? "auto" : Number(v));

/**
 * `POST /v1/fine_tuning/jobs` in the method shape: `method` "supervised" or "dpo" (with
 * `beta`); `epochs`, `batch`, `lr` and `beta` are form text ("" is auto).
 */
export function createJob({ model, trainingFile, validationFile, method, epochs = "", batch = "", lr = "", beta = "", suffix = "" }) {
  const hyperparameters = { n_epochs: num(epochs), batch_size: num(batch), learning_rate_multiplier: num(lr) };
  if (method === "dpo") hyperparameters.beta = num(beta);
  const body = { model, training_file: trainingFile, method: { type: method, [method]: { hyperparameters } } };
  if (validationFile) body.validation_file = validationFile;
  if (suffix.trim()) body.suffix = suffix.trim();
  return post("/v1/fine_tuning/jobs", body);
}

function CreateJob({ files, onCreated }) {
  const [models, setModels] = useState([]);
  const [method, setMethod] = useState("supervised");
  const [error, setError] = useState("");
  useEffect(() => {
    baseModels().then(setModels, (e) => setError(e.message));
  }, []);
  async function create(e) {
    e.preventDefault();
    const f = e.target.elements;
    setError("");
    try {
      onCreated(await createJob({
        model: f.model.value, trainingFile: f.training.value, validationFile: f.validation.value, method,
        epochs: f.epochs.value, batch: f.batch.value, lr: f.lr.value, beta: f.beta?.value ?? "", suffix: f.suffix.value,
      }));
    } catch (err) {
      setError(err.message);
    }
  }
  const options = files.map((f) => html`<option value=${f.id}>${f.filename} (${f.id})</option>`);
  return html`<form class="grid" onSubmit=${create}>
    <label>Base model <select name="model">${models.map((m) => html`<option value=${m.id}>${m.id}</option>`)}</select></label>
    <label>Method <select value=${method} onChange=${(e) => setMethod(e.target.value)} data-testid="method">
      <option value="supervised">supervised (chat file)</option><option value="dpo">DPO (preference file)</option></select></label>
    <label>Training file <select name="training" data-testid="training-file">${options}</select></label>
    <label>Validation file <select name="validation"><option value="">none</option>${options}</select></label>
    <label>Epochs <input name="epochs" placeholder="auto" data-testid="epochs" /></label>
    <label>Batch size <input name="batch" placeholder="auto" data-testid="batch" /></label>
    <label>Learning-rate multiplier <input name="lr" placeholder="auto" /></label>
    ${method === "dpo" && html`<label>Beta <input name="beta" placeholder="auto (0.1)" /></label>`}
    <label>Suffix <input name="suffix" placeholder="optional" /></label>
    <button type="submit" disabled=${!files.length} data-testid="create-job">Create job</button>
    ${error && html`<p class="error" role="alert">${error}</p>`}
  </form>`;
}

/** Every event of a job, oldest first; `known` (by id) is extended with the newest pages. */
async function events(id, known) {
  let after = "";
  for (;;) {
    const page = await get(`/v1/fine_tuning/jobs/${id}/events?limit=100${after && `&after=${after}`}`);
    let seen = false;
    for (const e of page.data) {
      if (known.has(e.id)) seen = true;
      else known.set(e.id, e);
    }
    if (seen || !page.has_more || !page.data.length) break;
    after = page.last_id;
  }
  return [...known.values()].sort((a, b) => Number(a.id.split("-")[1]) - Number(b.id.split("-")[1]));
}

function Job({ id, setModel, onFinal }) {
  const [job, setJob] = useState(null);
  const [evs, setEvs] = useState([]);
  const [ckpts, setCkpts] = useState([]);
  const [error, setError] = useState("");
  const known = useRef(new Map());
  const [tick, setTick] = useState(0);

  useEffect(() => {
    known.current = new Map();
    setEvs([]);
    setJob(null);
  }, [id]);
  useEffect(() => {
    let timer;
    let live = true;
    async function poll() {
      try {
        const j = await get(`/v1/fine_tuning/jobs/${id}`);
        const list = await events(id, known.current);
        const c = await get(`/v1/fine_tuning/jobs/${id}/checkpoints?limit=100`);
        if (!live) return;
        setJob(j);
        setEvs(list);
        setCkpts(c.data);
        setError("");
        if (!FINAL.includes(j.status)) timer = setTimeout(poll, POLL_MS);
        else onFinal();
      } catch (e) {
        if (live) {
          setError(e.message);
          timer = setTimeout(poll, POLL_MS * 3);
        }
      }
    }
    poll();
    return () => {
      live = false;
      clearTimeout(timer);
    };
  }, [id, tick]);

  async function act(what) {
    try {
      setJob(await post(`/v1/fine_tuning/jobs/${id}/${what}`));
      setTick(tick + 1);
    } catch (e) {
      setError(e.message);
    }
  }

  if (!job) return html`<p class="muted">${error || "Loading the job…"}</p>`;
  const metric = (k) => evs.filter((e) => e.type === "metrics" && typeof e.data?.[k] === "number").map((e) => [e.data.step, e.data[k]]);
  const train = metric("train_loss");
  const valid = metric("valid_loss");
  const accuracy = metric("full_valid_mean_token_accuracy");
  const dpo = job.method?.type === "dpo";
  const pairs = [metric("train_pair_accuracy"), metric("full_valid_pair_accuracy")];
  const hp = job.hyperparameters || {};
  return html`<section class="job" data-testid="job">
    <h3>${job.id} <span class="status ${job.status}" data-testid="job-status">${job.status}</span></h3>
    <p>${job.model} → ${job.fine_tuned_model || "…"} · ${dpo ? `DPO, β ${job.method.dpo?.hyperparameters?.beta}` : "supervised"} · epochs ${hp.n_epochs} · batch ${hp.batch_size} · lr × ${hp.learning_rate_multiplier}
      ${job.trained_tokens ? ` · ${fmt.int(job.trained_tokens)} tokens trained` : ""}</p>
    ${job.error?.message && html`<p class="error" role="alert">${job.error.message}</p>`}
    ${error && html`<p class="error" role="alert">${error}</p>`}
    <div class="row">
      ${["queued", "running", "validating_files"].includes(job.status) && html`<button onClick=${() => act("pause")}>Pause</button>`}
      ${job.status === "paused" && html`<button onClick=${() => act("resume")}>Resume</button>`}
      ${!FINAL.includes(job.status) && html`<button class="danger" onClick=${() => act("cancel")}>Cancel</button>`}
      ${job.status === "succeeded" && job.fine_tuned_model && html`<button data-testid="chat-with" onClick=${() => { setModel(job.fine_tuned_model); location.hash = "#/chat"; }}>Chat with this model</button>`}
    </div>
    <${LineChart} title="Loss" xLabel="step" testid="loss-chart"
      series=${[{ name: "train", cls: "s1", points: train }, { name: "validation", cls: "s2", points: valid }]} />
    ${dpo && html`<${LineChart} title="Pair accuracy (chosen answer's reward above the rejected one's)" xLabel="step" testid="pair-chart"
      series=${[{ name: "train", cls: "s1", points: pairs[0] }, { name: "validation", cls: "s2", points: pairs[1] }]} />`}
    ${accuracy.length > 0 && html`<${LineChart} title="Validation token accuracy" xLabel="step" series=${[{ name: "accuracy", cls: "s3", points: accuracy }]} />`}
    <h4>Checkpoints</h4>
    ${ckpts.length
      ? html`<table><thead><tr><th>step</th><th>model</th><th>metrics</th><th></th></tr></thead><tbody>
          ${ckpts.map((c) => html`<tr><td>${c.step_number}</td><td>${c.fine_tuned_model_checkpoint}</td>
            <td>${Object.entries(c.metrics || {}).filter(([k, v]) => k !== "step" && typeof v === "number").map(([k, v]) => `${k} ${v.toFixed(4)}`).join(", ")}</td>
            <td><button class="link" onClick=${() => { setModel(c.fine_tuned_model_checkpoint); location.hash = "#/chat"; }}>chat</button></td></tr>`)}
        </tbody></table>`
      : html`<p class="muted">None yet.</p>`}
    <h4>Events</h4>
    <ol class="events" data-testid="events">${evs.slice().reverse().map((e) => html`<li class=${e.level}><time>${new Date(e.created_at * 1000).toLocaleTimeString()}</time> ${e.message}</li>`)}</ol>
  </section>`;
}

export function Tune({ setModel }) {
  const [files, setFiles] = useState([]);
  const [jobs, setJobs] = useState([]);
  const [selected, setSelected] = useState(() => new URLSearchParams(location.hash.split("?")[1] || "").get("job") || "");
  const [error, setError] = useState("");
  async function load() {
    try {
      const [f, j] = await Promise.all([get("/v1/files"), get("/v1/fine_tuning/jobs?limit=50")]);
      setFiles(f.data.filter((x) => x.purpose === "fine-tune"));
      setJobs(j.data);
      setError("");
    } catch (e) {
      setError(e.message);
    }
  }
  useEffect(() => {
    load();
  }, []);
  return html`<main class="page tune">
    <h2>Fine-tuning</h2>
    ${error && html`<p class="error" role="alert">${error}</p>`}
    <h3>1. Upload a training file</h3>
    <p class="muted">Chat JSONL: one <code>{"messages": [...]}</code> per line (the chat page exports this); for DPO, preference JSONL (the ranking page writes it).</p>
    <${Upload} onUploaded=${load} />
    <h3>2. Create a job</h3>
    <${CreateJob} files=${files} onCreated=${(j) => { setSelected(j.id); load(); }} />
    <h3>3. Jobs</h3>
    <ul class="jobs">
      ${jobs.map((j) => html`<li class=${j.id === selected ? "active" : ""}><a href="#/tune" onClick=${() => setSelected(j.id)}>${j.id}</a> <span class="status ${j.status}">${j.status}</span> ${j.fine_tuned_model || ""}</li>`)}
    </ul>
    ${selected && html`<${Job} id=${selected} setModel=${setModel} onFinal=${load} />`}
  </main>`;
}
