// Conversations, kept in the browser (IndexedDB), and their exchange format: OpenAI chat JSONL,
// one `{"messages": [...]}` per line, the same file fine-tuning takes.

const DB = "ferrolm";
const STORE = "conversations";

function open() {
  return new Promise((resolve, reject) => {
    const req = indexedDB.open(DB, 1);
    req.onupgradeneeded = () => req.result.createObjectStore(STORE, { keyPath: "id" });
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(new Error(`the browser's IndexedDB cannot be opened: ${req.error}`));
  });
}

async function run(mode, f) {
  const db = await open();
  return new Promise((resolve, reject) => {
    const tx = db.transaction(STORE, mode);
    const req = f(tx.objectStore(STORE));
    tx.oncomplete = () => resolve(req?.result);
    tx.onerror = () => reject(tx.error);
  });
}

/** Every conversation, newest first. */
export async function all() {
  const list = (await run("readonly", (s) => s.getAll())) || [];
  return list.sort((a, b) => b.updated - a.updated);
}

export const put = (c) => run("readwrite", (s) => s.put({ ...c, updated: Date.now() }));
export const remove = (id) => run("readwrite", (s) => s.delete(id));

export function newConversation(fields = {}) {
  return { id: crypto.randomUUID(), title: "New chat", system: "", messages: [], updated: Date.now(), ...fields };
}

export function titleOf(messages) {
  const first = messages.find((m) => m.role === "user");
  return first ? first.content.slice(0, 60) : "New chat";
}

/** The conversations as OpenAI chat JSONL. */
export function toJsonl(convs) {
  return convs
    .map((c) => {
      const messages = (c.system ? [{ role: "system", content: c.system }] : []).concat(
        c.messages.filter((m) => m.content).map(({ role, content }) => ({ role, content })),
      );
      return JSON.stringify({ messages });
    })
    .join("\n") + "\n";
}

/** Conversations from OpenAI chat JSONL; throws with the line number of the first bad line. */
export function fromJsonl(text) {
  const out = [];
  text.split("\n").forEach((line, i) => {
    if (!line.trim()) return;
    let v;
    try {
      v = JSON.parse(line);
    } catch (e) {
      throw new Error(`line ${i + 1}: not JSON (${e.message})`);
    }
    if (!Array.isArray(v.messages)) throw new Error(`line ${i + 1}: no "messages" array`);
    let system = "";
    const messages = [];
    for (const [j, m] of v.messages.entries()) {
      if (typeof m.content !== "string" || !["system", "user", "assistant"].includes(m.role)) {
        throw new Error(`line ${i + 1}: message ${j + 1} needs a role (system, user, assistant) and text content`);
      }
      if (m.role === "system" && j === 0) system = m.content;
      else messages.push({ role: m.role, content: m.content });
    }
    out.push(newConversation({ system, messages, title: titleOf(messages) }));
  });
  return out;
}
