// The web UI in headless Chromium (driven by playwright-core), against live servers started by
// crates/cli/tests/ui.rs:
//   FERROLM_KEYED   a server whose data dir has a key, FERROLM_KEY that (admin) key
//   FERROLM_OPEN    a server without keys (loopback: no key needed); its ranking round's pair
//                   is checked in its data dir by ui.rs, and trains a DPO job
//   FERROLM_DOOMED  a third server, FERROLM_DOOMED_PID its process, stopped (SIGSTOP) then
//                   killed mid-reply
//   FERROLM_CHROMIUM the browser (Debian's chromium)
//   FERROLM_UI_SHOTS a directory for one screenshot per page (optional)
// Every check is printed; the script exits 1 if any failed.
import { chromium } from "playwright-core";
import { mkdirSync, readFileSync } from "node:fs";

const { FERROLM_KEYED: keyed, FERROLM_KEY: key, FERROLM_OPEN: open, FERROLM_DOOMED: doomed, FERROLM_DOOMED_PID: doomedPid } = process.env;
const shots = process.env.FERROLM_UI_SHOTS;
const T = 60_000;
let failed = 0;

function check(name, ok, detail = "") {
  console.log(`${ok ? "ok  " : "FAIL"} ${name}${detail ? `: ${detail}` : ""}`);
  if (!ok) failed++;
}

async function shot(page, name) {
  if (!shots) return;
  mkdirSync(shots, { recursive: true });
  await page.screenshot({ path: `${shots}/${name}.png`, fullPage: true });
}

const browser = await chromium.launch({
  executablePath: process.env.FERROLM_CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox"],
});
const errors = [];
async function newPage(base) {
  const ctx = await browser.newContext({ baseURL: base, viewport: { width: 1280, height: 800 } });
  const page = await ctx.newPage();
  page.on("pageerror", (e) => errors.push(`${base}: ${e.message}`));
  page.on("console", (m) => m.type() === "error" && !/Failed to load resource/.test(m.text()) && errors.push(`${base}: console: ${m.text()}`));
  return page;
}

/** Wait until no reply is being generated and the last one has its usage line. */
async function settled(page) {
  await page.waitForFunction(() => {
    const metas = document.querySelectorAll("[data-testid=reply-meta]");
    return !document.querySelector("[data-testid=stop]") && metas.length && /finish|stopped/.test(metas[metas.length - 1].textContent);
  }, null, { timeout: T });
}

/** Send `text` with Enter and wait for the reply to settle; returns the texts the reply body had. */
async function chat(page, text) {
  await page.getByTestId("prompt").fill(text);
  await page.evaluate(() => {
    window.__seen = new Set();
    const box = document.querySelector("[data-testid=messages]");
    new MutationObserver(() => {
      const bodies = box.querySelectorAll("[data-testid=msg-assistant] .body");
      const last = bodies[bodies.length - 1];
      if (last && last.textContent) window.__seen.add(last.textContent);
    }).observe(box, { subtree: true, childList: true, characterData: true });
  });
  await page.getByTestId("prompt").press("Enter");
  await settled(page);
  return page.evaluate(() => [...window.__seen]);
}

try {
  // --- Sign in (a keyed server) --------------------------------------------------------------
  const page = await newPage(keyed);
  await page.goto("/");
  await page.locator("input[name=key]").waitFor({ timeout: T });
  await shot(page, "signin");
  await page.locator("input[name=key]").fill("sk-wrong-key");
  await page.getByRole("button", { name: "Sign in" }).click();
  const err = await page.getByTestId("signin-error").textContent({ timeout: T });
  check("a wrong key gives a clear sign-in error", /refused/.test(err) && /not valid/.test(err), err);
  await page.locator("input[name=key]").fill(key);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByTestId("prompt").waitFor({ timeout: T });
  check("the right key signs in", true);

  // --- Chat: a reply streams in, with its usage ---------------------------------------------
  await page.locator("label:has-text('Max tokens') input").fill("40");
  await page.locator("label:has-text('Temperature') input").fill("0");
  const seen = await chat(page, "Write a short poem about the sea.");
  const reply = await page.locator("[data-testid=msg-assistant] .body").last().textContent();
  check("a chat reply streams in (the body grew in steps)", seen.length >= 3 && reply.length > 0, `${seen.length} states, reply ${JSON.stringify(reply.slice(0, 80))}`);
  const meta = await page.getByTestId("reply-meta").last().textContent();
  const completion = Number(meta.match(/completion (\d+)/)?.[1]);
  const cost = meta.match(/cost (\$\S+)/)?.[1];
  check("the reply shows its tokens, first token, tok/s and cost", completion > 0 && /prompt \d+ \(cached \d+\)/.test(meta) && /first token/.test(meta) && /tok\/s/.test(meta) && !!cost, meta);
  await shot(page, "chat");

  // Regenerate replaces the last reply; editing the question resends it.
  await page.getByTestId("regenerate").click();
  await settled(page);
  check("regenerate leaves one question and one reply", (await page.getByTestId("msg-assistant").count()) === 1 && (await page.getByTestId("msg-user").count()) === 1);

  // Edit and resend: the question is replaced, and so is the reply after it.
  await page.getByRole("button", { name: "Edit" }).first().click();
  await page.locator(".msg.editing textarea").fill("Write a short poem about the moon.");
  await page.locator(".msg.editing").getByRole("button", { name: "Send" }).click();
  await settled(page);
  const users = await page.getByTestId("msg-user").allTextContents();
  check("edit and resend replaces the question and its reply", users.length === 1 && /moon/.test(users[0]) && (await page.getByTestId("msg-assistant").count()) === 1, users.join(" | "));

  // Export to OpenAI chat JSONL; import names a bad line and takes a good file.
  const [download] = await Promise.all([page.waitForEvent("download"), page.getByRole("button", { name: "Export JSONL" }).click()]);
  const exported = readFileSync(await download.path(), "utf8").trim().split("\n").map((l) => JSON.parse(l));
  check("export writes OpenAI chat JSONL", exported.length === 1 && exported[0].messages[0].role === "user" && /moon/.test(exported[0].messages[0].content) && exported[0].messages[1].role === "assistant", JSON.stringify(exported).slice(0, 160));
  const importer = page.locator(".convs input[type=file]");
  await importer.setInputFiles({ name: "bad.jsonl", mimeType: "application/jsonl", buffer: Buffer.from('{"messages": []}\n{oops\n') });
  const importErr = await page.locator(".notice").textContent({ timeout: T });
  check("importing a bad JSONL names its line", /bad.jsonl: line 2: not JSON/.test(importErr), importErr);
  await importer.setInputFiles({ name: "chats.jsonl", mimeType: "application/jsonl", buffer: Buffer.from(JSON.stringify({ messages: [{ role: "system", content: "Be brief." }, { role: "user", content: "Imported question" }, { role: "assistant", content: "Imported answer" }] }) + "\n") });
  await page.getByRole("link", { name: "Imported question" }).waitFor({ timeout: T });
  check("importing a JSONL adds its conversation", true);

  // Esc stops a reply.
  await page.locator("label:has-text('Max tokens') input").fill("400");
  await page.getByTestId("prompt").fill("Write a long story about a dragon who learns to sail.");
  await page.getByTestId("prompt").press("Enter");
  await page.locator("[data-testid=msg-assistant] .body").nth(1).filter({ hasText: /\w/ }).waitFor({ timeout: T });
  await page.keyboard.press("Escape");
  await page.getByTestId("send").waitFor({ timeout: 10_000 });
  const stopped = await page.getByTestId("reply-meta").last().textContent();
  check("Esc stops the reply", /stopped/.test(stopped), stopped);

  // A huge paste: the server's refusal is shown.
  await page.locator("label:has-text('Max tokens') input").fill("16");
  await page.getByTestId("new-chat").click();
  await page.getByTestId("prompt").fill("lorem ipsum dolor sit amet ".repeat(3000));
  await page.getByTestId("prompt").press("Enter");
  const refusal = await page.getByTestId("chat-error").last().textContent({ timeout: T });
  check("a huge paste shows the server's 400", /^400 /.test(refusal), refusal.slice(0, 200));

  // --- Usage: the request just made, with its tokens and cost --------------------------------
  await page.getByTestId("nav-usage").click();
  await page.getByTestId("usage-by-model").waitFor({ timeout: T });
  const row = await page.getByTestId("usage-by-model").textContent();
  const requests = Number((await page.getByTestId("usage-requests").textContent()).replace(/,/g, ""));
  const usageCompletion = Number((await page.getByTestId("usage-completion").textContent()).replace(/,/g, ""));
  const usageCost = await page.getByTestId("usage-cost").textContent();
  check("the usage page counts the chat requests (5: reply, regenerate, edit, stopped, refused)", requests === 5, `requests ${requests}; ${row}`);
  check("the usage page has the replies' tokens and cost", usageCompletion >= completion && /^\$/.test(usageCost) && /smollm2/i.test(row), `completion ${usageCompletion} ≥ ${completion}, cost ${usageCost}`);
  const latency = await page.getByTestId("usage-latency").textContent();
  check("the usage page shows latency percentiles", /^[\d.]+ m?s \/ [\d.]+ m?s$/.test(latency), latency);
  const hosted = await page.getByTestId("usage-hosted").locator("tbody tr").count();
  check("the usage page compares the traffic with hosted models", hosted > 0, `${hosted} hosted models`);
  await shot(page, "usage");

  // --- Sanitising: a stored reply with script and an onerror image stays text -----------------
  await page.evaluate(async () => {
    const evil = "Look: <script>window.__pwned = 1</script> and <img src=x onerror=\"window.__pwned = 2\">\n\n"
      + "**bold <img src=y onerror=window.__pwned=3>** [click](javascript:window.__pwned=4)\n\n```html\n<script>window.__pwned = 5</script>\n```";
    await new Promise((resolve, reject) => {
      const req = indexedDB.open("ferrolm", 1);
      req.onupgradeneeded = () => req.result.createObjectStore("conversations", { keyPath: "id" });
      req.onsuccess = () => {
        const tx = req.result.transaction("conversations", "readwrite");
        tx.objectStore("conversations").put({ id: "evil", title: "evil reply", system: "", updated: Date.now() + 1e6,
          messages: [{ role: "user", content: "<img src=z onerror=window.__pwned=6>" }, { role: "assistant", content: evil, meta: {} }] });
        tx.oncomplete = resolve;
        tx.onerror = () => reject(tx.error);
      };
    });
  });
  await page.goto("/#/chat");
  await page.getByRole("link", { name: "evil reply" }).click();
  await page.locator("[data-testid=msg-assistant] .code").waitFor({ timeout: T });
  await page.waitForTimeout(500);
  const inert = await page.evaluate(() => {
    const box = document.querySelector("[data-testid=messages]");
    return {
      pwned: window.__pwned ?? null,
      scripts: box.querySelectorAll("script").length,
      imgs: box.querySelectorAll("img").length,
      jsLinks: [...box.querySelectorAll("a")].filter((a) => !/^https?:|^mailto:/.test(a.getAttribute("href") || "")).length,
      text: box.textContent,
    };
  });
  check("a reply's <script> and <img onerror> are shown as text and never run",
    inert.pwned === null && inert.scripts === 0 && inert.imgs === 0 && inert.jsLinks === 0 && inert.text.includes("<script>window.__pwned = 1</script>") && inert.text.includes("onerror"),
    JSON.stringify({ ...inert, text: inert.text.slice(0, 120) }));

  // --- Fine-tuning: a bad line's number, then a tiny job whose loss chart fills ---------------
  await page.getByTestId("nav-tune").click();
  const good = Array.from({ length: 24 }, (_, i) => JSON.stringify({ messages: [{ role: "user", content: `What is ${i} plus one?` }, { role: "assistant", content: `Bolt says: ${i + 1}.` }] }));
  const bad = [good[0], good[1], "{\"messages\": [{\"role\": \"user\"", good[2]].join("\n") + "\n";
  await page.getByTestId("upload-file").setInputFiles({ name: "bad.jsonl", mimeType: "application/jsonl", buffer: Buffer.from(bad) });
  await page.getByTestId("upload").click();
  const upErr = await page.getByTestId("upload-error").textContent({ timeout: T });
  check("uploading a file with a bad line shows that line's number", /line 3\b/.test(upErr), upErr);
  await page.getByTestId("upload-file").setInputFiles({ name: "train.jsonl", mimeType: "application/jsonl", buffer: Buffer.from(good.join("\n") + "\n") });
  await page.getByTestId("upload").click();
  await page.getByTestId("training-file").locator("option").first().waitFor({ state: "attached", timeout: T });
  await page.getByTestId("epochs").fill("1");
  await page.getByTestId("batch").fill("1");
  await page.getByTestId("create-job").click();
  await page.getByTestId("job").waitFor({ timeout: T });
  const counts = [];
  const t0 = Date.now();
  let status = "";
  while (Date.now() - t0 < 240_000) {
    status = await page.getByTestId("job-status").textContent();
    const n = Number(await page.getByTestId("loss-chart").getAttribute("data-points"));
    if (counts.at(-1) !== n) counts.push(n);
    if (["succeeded", "failed", "cancelled"].includes(status)) break;
    await page.waitForTimeout(200);
  }
  check("a tiny job succeeds and its loss chart fills as events arrive", status === "succeeded" && counts.length >= 3 && counts.at(-1) >= 2, `status ${status}, points seen ${counts.join(" → ")}`);
  await shot(page, "fine-tuning");
  if (status === "succeeded") {
    await page.getByTestId("chat-with").click();
    const picked = await page.getByTestId("model").inputValue({ timeout: T });
    check("\"chat with this model\" picks the fine-tuned model", /^ft:/.test(picked), picked);
  }

  // --- Server page ---------------------------------------------------------------------------
  await page.getByTestId("nav-server").click();
  await page.getByTestId("server-models").locator("tbody tr").first().waitFor({ timeout: T });
  await page.waitForTimeout(2500);
  const kv = await page.getByTestId("kv-used").textContent();
  const gens = await page.getByTestId("generations").textContent();
  check("the server page shows KV use and the generations from /metrics", /blocks/.test(kv) && Number(gens) >= 3, `${kv}; generations ${gens}`);

  // --- Keys (the signed-in key is an admin key): create one with limits, use it, revoke it ----
  const listed = await page.getByTestId("key-row").count();
  check("the admin sees the keys, with usage per key", listed === 1 && /ui \(admin\)/.test(await page.getByTestId("key-row").first().textContent()), await page.getByTestId("keys").textContent());
  await page.getByTestId("key-name").fill("temp");
  await page.getByTestId("key-rpm").fill("30");
  await page.getByTestId("key-budget").fill("0.5");
  await page.getByTestId("create-key").click();
  const secret = await page.getByTestId("key-secret").textContent({ timeout: T });
  const tempRow = page.locator("[data-testid=key-row][data-name=temp]");
  await tempRow.waitFor({ timeout: T });
  const tempText = await tempRow.textContent();
  check("the admin creates a key with limits; its secret is shown once", /^flm-\w{40}$/.test(secret) && /30/.test(tempText) && /\$0\.50/.test(tempText) && /active/.test(tempText), `${secret.slice(0, 8)}…; ${tempText}`);
  await shot(page, "server");
  const other = await newPage(keyed);
  await other.goto("/");
  await other.locator("input[name=key]").fill(secret);
  await other.getByRole("button", { name: "Sign in" }).click();
  await other.getByTestId("prompt").waitFor({ timeout: T });
  await other.getByTestId("nav-server").click();
  const forbidden = await other.getByTestId("keys-error").textContent({ timeout: T });
  check("the new key signs in, and as a non-admin key sees the keys refused (403)", /^403 /.test(forbidden) && /not an admin key/.test(forbidden), forbidden);
  await tempRow.getByTestId("revoke").click();
  await tempRow.locator(".key-status", { hasText: "revoked" }).waitFor({ timeout: T });
  const gonePage = await newPage(keyed);
  await gonePage.goto("/");
  await gonePage.locator("input[name=key]").fill(secret);
  await gonePage.getByRole("button", { name: "Sign in" }).click();
  const revokedErr = await gonePage.getByTestId("signin-error").textContent({ timeout: T });
  check("the revoked key then fails sign-in", /refused/.test(revokedErr) && /revoked/.test(revokedErr), revokedErr);

  // --- An open (keyless loopback) server needs no sign-in ------------------------------------
  const openPage = await newPage(open);
  await openPage.goto("/");
  await openPage.getByTestId("prompt").waitFor({ timeout: T });
  check("a keyless loopback server opens the chat without a key", /open server/.test(await openPage.locator(".who").textContent()));

  // --- A ranking round appends a DPO pair to the data dir (ui.rs reads the file) ---------------
  await openPage.getByTestId("nav-rank").click();
  await openPage.getByTestId("rank-prompts").fill("Name a colour and say why you like it.");
  await openPage.getByTestId("rank-max-tokens").fill("24");
  await openPage.getByTestId("rank-generate").click();
  await openPage.getByTestId("round").waitFor({ timeout: T });
  const answers = openPage.getByTestId("answer");
  check("a ranking round shows the n answers", (await answers.count()) === 2);
  await answers.nth(1).click();
  await answers.nth(0).click();
  await openPage.getByTestId("save-pairs").click();
  const ranked = await openPage.getByTestId("rank-status").textContent({ timeout: T });
  check("saving the order appends a preference pair", /^Appended 1 pair\(s\) to preferences\/open.jsonl \(1 in all\)/.test(ranked), ranked);

  // --- ... and starts a DPO job on that file, whose loss and pair-accuracy charts fill ---------
  // One pair, 20 epochs of batch 1: 20 steps; the loss has a point at each evaluation (every
  // 4 steps) and step event (10, 20), the pair accuracy at the step events.
  await openPage.getByTestId("dpo-beta").fill("0.1");
  await openPage.getByTestId("dpo-epochs").fill("20");
  await openPage.getByTestId("dpo-batch").fill("1");
  await openPage.getByTestId("start-dpo").click();
  const started = await openPage.getByTestId("dpo-started").textContent({ timeout: T });
  check("the ranking page starts a DPO job on the preference file", /DPO job ftjob-\S+ started on 1 pair/.test(started), started);
  await shot(openPage, "ranking");
  await openPage.getByTestId("dpo-job-link").click();
  await openPage.getByTestId("job").waitFor({ timeout: T });
  const dpoCounts = [];
  const d0 = Date.now();
  let dpoStatus = "";
  while (Date.now() - d0 < 300_000) {
    dpoStatus = await openPage.getByTestId("job-status").textContent();
    const n = Number(await openPage.getByTestId("loss-chart").getAttribute("data-points"));
    if (dpoCounts.at(-1) !== n) dpoCounts.push(n);
    if (["succeeded", "failed", "cancelled"].includes(dpoStatus)) break;
    await openPage.waitForTimeout(200);
  }
  await openPage.waitForTimeout(1500);
  const pairPoints = Number(await openPage.getByTestId("pair-chart").getAttribute("data-points"));
  const jobLine = await openPage.locator("[data-testid=job] > p").first().textContent();
  check("the DPO job succeeds and its loss chart fills as events arrive", dpoStatus === "succeeded" && dpoCounts.length >= 3 && dpoCounts.at(-1) >= 4 && /DPO, β 0.1/.test(jobLine), `status ${dpoStatus}, points seen ${dpoCounts.join(" → ")}; ${jobLine}`);
  check("the DPO job's pair-accuracy chart has its points", pairPoints >= 2, `${pairPoints} points`);
  await shot(openPage, "fine-tuning-dpo");

  // --- A server that stalls, then one that goes away mid-reply: an error, not a hang -----------
  const gone = await newPage(doomed);
  await gone.goto("/");
  await gone.locator("label:has-text('Max tokens') input").fill("800");
  await gone.getByTestId("prompt").fill("Write a very long story about a lighthouse keeper.");
  await gone.getByTestId("prompt").press("Enter");
  await gone.locator("[data-testid=msg-assistant] .body").filter({ hasText: /\w/ }).waitFor({ timeout: T });
  process.kill(Number(doomedPid), "SIGSTOP");
  const s0 = Date.now();
  const stalled = await gone.getByTestId("chat-error").textContent({ timeout: 40_000 }).finally(() => process.kill(Number(doomedPid), "SIGCONT"));
  check("a server that stalls mid-reply shows an error after 20 s", /sent nothing for 20 s mid-reply/.test(stalled), `after ${((Date.now() - s0) / 1000).toFixed(1)} s: ${stalled}`);
  await gone.getByTestId("send").waitFor({ timeout: 10_000 });
  await gone.getByTestId("new-chat").click();
  await gone.getByTestId("prompt").fill("Write a very long story about a lighthouse keeper.");
  await gone.getByTestId("prompt").press("Enter");
  await gone.locator("[data-testid=msg-assistant] .body").filter({ hasText: /\w/ }).waitFor({ timeout: T });
  process.kill(Number(doomedPid), "SIGKILL");
  const broke = await gone.getByTestId("chat-error").last().textContent({ timeout: 15_000 });
  check("a server that goes away mid-reply shows an error", /stopped or restarted/.test(broke), broke);

  check("no script errors in the pages", errors.length === 0, errors.join("; "));
} catch (e) {
  check("the run finished", false, e.stack);
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
