// Markdown to Preact nodes, for model output. Safe by construction: it never builds an HTML
// string (no innerHTML anywhere in the UI); every piece of text becomes a text node, so a
// reply's `<script>` or `<img onerror=…>` shows as the characters it is. Links keep only
// http(s) and mailto targets. Covered: fenced code blocks, headings, lists, quotes, rules,
// paragraphs, inline code, bold, italics, links.

import { h } from "./vendor/preact.mjs";

const SAFE_URL = /^(https?:|mailto:)/i;

function inline(text) {
  const out = [];
  const re = /(`+)([\s\S]+?)\1|\*\*([^*]+)\*\*|\*([^*\s][^*]*)\*|\[([^\]]+)\]\(([^)\s]+)\)/g;
  let last = 0;
  let m;
  while ((m = re.exec(text))) {
    if (m.index > last) out.push(text.slice(last, m.index));
    if (m[1]) out.push(h("code", null, m[2]));
    else if (m[3]) out.push(h("strong", null, inline(m[3])));
    else if (m[4]) out.push(h("em", null, inline(m[4])));
    else if (SAFE_URL.test(m[6])) {
      out.push(h("a", { href: m[6], target: "_blank", rel: "noopener noreferrer nofollow" }, inline(m[5])));
    } else out.push(m[0]);
    last = re.lastIndex;
  }
  if (last < text.length) out.push(text.slice(last));
  return out;
}

function copy(text) {
  navigator.clipboard?.writeText(text);
}

function codeBlock(lang, code, key) {
  return h(
    "div",
    { class: "code", key },
    h("div", { class: "code-head" }, h("span", null, lang || "code"), h("button", { type: "button", onClick: () => copy(code) }, "copy")),
    h("pre", null, h("code", null, code)),
  );
}

/** The nodes of `src`. An unclosed fence (a reply still streaming) runs to the end. */
export function markdown(src) {
  const lines = src.replace(/\r\n/g, "\n").split("\n");
  const blocks = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(/^\s*(```|~~~)\s*([\w+-]*)/);
    if (fence) {
      const body = [];
      i++;
      while (i < lines.length && !lines[i].trim().startsWith(fence[1])) body.push(lines[i++]);
      i++;
      blocks.push(codeBlock(fence[2], body.join("\n"), blocks.length));
      continue;
    }
    if (!line.trim()) {
      i++;
      continue;
    }
    const head = line.match(/^(#{1,6})\s+(.*)/);
    if (head) {
      blocks.push(h(`h${Math.min(head[1].length + 2, 6)}`, { key: blocks.length }, inline(head[2])));
      i++;
      continue;
    }
    if (/^\s*([-*_])(\s*\1){2,}\s*$/.test(line)) {
      blocks.push(h("hr", { key: blocks.length }));
      i++;
      continue;
    }
    const list = line.match(/^\s*([-*+]|\d+[.)])\s+/);
    if (list) {
      const ordered = /\d/.test(list[1]);
      const items = [];
      while (i < lines.length) {
        const it = lines[i].match(/^\s*([-*+]|\d+[.)])\s+(.*)/);
        if (it) items.push(it[2]);
        else if (lines[i].trim() && items.length && /^\s{2,}/.test(lines[i])) items[items.length - 1] += ` ${lines[i].trim()}`;
        else break;
        i++;
      }
      blocks.push(h(ordered ? "ol" : "ul", { key: blocks.length }, items.map((t, k) => h("li", { key: k }, inline(t)))));
      continue;
    }
    if (line.startsWith(">")) {
      const quote = [];
      while (i < lines.length && lines[i].startsWith(">")) quote.push(lines[i++].replace(/^>\s?/, ""));
      blocks.push(h("blockquote", { key: blocks.length }, markdown(quote.join("\n"))));
      continue;
    }
    const para = [];
    while (i < lines.length && lines[i].trim() && !/^\s*(```|~~~|#{1,6}\s|>)/.test(lines[i])) para.push(lines[i++]);
    const parts = [];
    para.forEach((p, k) => {
      if (k) parts.push(h("br", null));
      parts.push(...inline(p));
    });
    blocks.push(h("p", { key: blocks.length }, parts));
  }
  return blocks;
}
