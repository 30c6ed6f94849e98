// The web UI's shell: sign-in, the navigation and a hash router (#/chat, #/usage, #/tune,
// #/rank, #/server). Pages are Preact components written with htm (no build step).

import { h, render } from "./vendor/preact.mjs";
import { useEffect, useState } from "./vendor/hooks.mjs";
import htm from "./vendor/htm.mjs";
import { auth, get, setKey } from "./api.js";
import { Chat } from "./chat.js";
import { Usage } from "./usage.js";
import { Tune } from "./tune.js";
import { Server } from "./server.js";
import { Rank } from "./rank.js";

const html = htm.bind(h);

const PAGES = {
  chat: ["Chat", Chat],
  usage: ["Usage & cost", Usage],
  tune: ["Fine-tuning", Tune],
  rank: ["Ranking", Rank],
  server: ["Server", Server],
};

function route() {
  const name = location.hash.replace(/^#\/?/, "").split("?")[0];
  return PAGES[name] ? name : "chat";
}

function SignIn({ onIn, refused }) {
  const [key, setInput] = useState("");
  const [error, setError] = useState(refused);
  const [busy, setBusy] = useState(false);
  async function submit(e) {
    e.preventDefault();
    setBusy(true);
    setError("");
    setKey(key.trim());
    try {
      await get("/v1/models");
      onIn();
    } catch (err) {
      setKey("");
      setError(err.status === 401 ? `This key was refused. ${err.message}` : err.message);
    } finally {
      setBusy(false);
    }
  }
  return html`<main class="signin">
    <form onSubmit=${submit}>
      <h1>ferrolm</h1>
      <p>This server needs an API key. Keys come from <code>ferrolm keys create</code> on the server.</p>
      <label>API key <input type="password" name="key" autocomplete="current-password" value=${key} onInput=${(e) => setInput(e.target.value)} autofocus /></label>
      <button type="submit" disabled=${busy || !key.trim()}>Sign in</button>
      ${error && html`<p class="error" role="alert" data-testid="signin-error">${error}</p>`}
    </form>
  </main>`;
}

function App() {
  // "checking" | "in" | "out"; `open`: the server needs no key.
  const [state, setState] = useState({ phase: "checking" });
  const [page, setPage] = useState(route());
  // The model chat uses; the fine-tuning page sets it ("chat with this model").
  const [model, setModel] = useState(localStorage.getItem("ferrolm.model") || "");

  async function check() {
    try {
      await get("/v1/models");
      setState({ phase: "in", open: !auth.key });
    } catch (e) {
      if (e.status === 401) {
        const refused = auth.key ? `The saved key was refused. ${e.message}` : "";
        setKey("");
        setState({ phase: "out", refused });
      } else setState({ phase: "error", message: e.message });
    }
  }
  useEffect(() => {
    check();
    const f = () => setPage(route());
    addEventListener("hashchange", f);
    return () => removeEventListener("hashchange", f);
  }, []);
  useEffect(() => {
    if (model) localStorage.setItem("ferrolm.model", model);
  }, [model]);

  if (state.phase === "checking") return html`<p class="boot">Connecting…</p>`;
  if (state.phase === "error") {
    return html`<main class="signin"><p class="error" role="alert">${state.message}</p><button onClick=${check}>Retry</button></main>`;
  }
  if (state.phase === "out") return html`<${SignIn} refused=${state.refused} onIn=${() => setState({ phase: "in", open: false })} />`;
  const Page = PAGES[page][1];
  return html`<div class="shell">
    <header>
      <strong class="brand">ferrolm</strong>
      <nav>${Object.entries(PAGES).map(([k, [label]]) => html`<a href="#/${k}" class=${k === page ? "active" : ""} data-testid="nav-${k}">${label}</a>`)}</nav>
      <span class="who">
        ${state.open ? "open server (no key needed)" : "signed in with a key"}
        ${!state.open && html` <button class="link" onClick=${() => { setKey(""); setState({ phase: "out" }); }}>Sign out</button>`}
      </span>
    </header>
    <${Page} model=${model} setModel=${setModel} />
  </div>`;
}

render(html`<${App} />`, document.getElementById("app"));
