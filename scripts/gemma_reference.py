#!/usr/bin/env python3
"""Record llama.cpp's answers on the Gemma 3 270M GGUF, for ferrolm's golden test
(crates/cli/tests/gemma.rs reads golden/gemma3_270m_reference.json).

Usage (from the repository root; standard library only):
  python3 scripts/gemma_reference.py --server /path/to/llama-server \\
      --model ~/.cache/ferrolm/models/gemma-3-270m-q4_k_m.gguf \\
      [--out golden/gemma3_270m_reference.json] [--threads 2]

It starts `llama-server` on the file (one slot, 4096-token context) and records:
  * tokenize: for each text, /tokenize with add_special=false and parse_special=false
    (what `ferrolm tokenize --json TEXT` prints: no BOS, control-token strings as text);
  * greedy: for each raw prompt, /completion with temperature 0 and n_probs 2: the prompt
    ids (BOS + text), the generated ids and, per step, the top-2 log-probs, so the test
    can stop comparing at the first step where they are within 0.3 of each other;
  * top1: a 1,024-token text (BOS + the text below, cut to 1,024 ids) fed one position at
    a time with cache_prompt (each request adds one token to the cached prefix): at every
    position the id llama.cpp ranks first. The test holds ferrolm's argmax to it.
The file's sha256 is recorded, so the test knows the answers belong to its model.
"""

import argparse
import hashlib
import json
import socket
import subprocess
import sys
import time
import urllib.request

TOKENIZE_TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "Emoji: 😀🎉👍🏽 and a family 👨‍👩‍👧‍👦 and flags 🇫🇷🇯🇵",
    "CJK: 日本語のテキスト、中文文本和한국어 텍스트。",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "fn main() {\n\tlet x = vec![1, 2, 3];\n\tprintln!(\"{:?}\", x);\n}",
    "Runs of whitespace:  two,   three,    four,\t\ttabs,\n\n\nnewlines,      six spaces.",
    "   leading spaces and trailing   ",
    "\n\nleading newlines",
    "Special-looking: <start_of_turn>user <end_of_turn> <bos> <eos> <pad> [multimodal] <unk>",
    "HTML <div class=\"x\">text</div> and <0x41> and <|im_start|>",
    "Numbers 1234567890 3.14159 -42 1e10 0xFF",
    "Mixed: café naïve résumé Ünïcödé Ελληνικά русский العربية हिन्दी",
    "Control \u0001\u0002 chars and NBSP\u00a0here and ZWJ\u200dhere",
    "https://example.com/path?query=1&b=2#frag",
    "a",
    " ",
    "",
]

GREEDY_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def is_prime(n):\n",
    "The three primary colors are",
    "Water boils at",
    "import numpy as np\n\narr = np.",
    "The largest planet in our solar system is",
    "Translate to French: Good morning! ->",
    "1, 2, 3, 4, 5,",
    "To make a cup of tea, first",
    "The theory of relativity was developed by",
    "Q: What is 12 times 12?\nA:",
]
GREEDY_TOKENS = 24

# Public-domain prose (Project Gutenberg: Austen, Melville, Darwin, Dickens), repeated with
# variations until it is long enough; only the first 1,024 ids are used.
TOP1_TEXT = """It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife. However little known the feelings or views of such a man may be on his first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered the rightful property of some one or other of their daughters.

Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse, and nothing particular to interest me on shore, I thought I would sail about a little and see the watery part of the world. It is a way I have of driving off the spleen and regulating the circulation. Whenever I find myself growing grim about the mouth; whenever it is a damp, drizzly November in my soul; whenever I find myself involuntarily pausing before coffin warehouses, and bringing up the rear of every funeral I meet; and especially whenever my hypos get such an upper hand of me, that it requires a strong moral principle to prevent me from deliberately stepping into the street, and methodically knocking people's hats off, then, I account it high time to get to sea as soon as I can.

When on board H.M.S. Beagle, as naturalist, I was much struck with certain facts in the distribution of the organic beings inhabiting South America, and in the geological relations of the present to the past inhabitants of that continent. These facts, as will be seen in the latter chapters of this volume, seemed to throw some light on the origin of species, that mystery of mysteries, as it has been called by one of our greatest philosophers. On my return home, it occurred to me, in 1837, that something might perhaps be made out on this question by patiently accumulating and reflecting on all sorts of facts which could possibly have any bearing on it.

It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it was the season of Darkness, it was the spring of hope, it was the winter of despair, we had everything before us, we had nothing before us, we were all going direct to Heaven, we were all going direct the other way; in short, the period was so far like the present period, that some of its noisiest authorities insisted on its being received, for good or for evil, in the superlative degree of comparison only.

```python
def merge_sorted(a, b):
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i]); i += 1
        else:
            out.append(b[j]); j += 1
    return out + a[i:] + b[j:]
```

Mr. Bennet was so odd a mixture of quick parts, sarcastic humour, reserve, and caprice, that the experience of three and twenty years had been insufficient to make his wife understand his character. Her mind was less difficult to develop. She was a woman of mean understanding, little information, and uncertain temper. When she was discontented, she fancied herself nervous. The business of her life was to get her daughters married; its solace was visiting and news.

There is nothing in the world so irresistibly contagious as laughter and good humour. Marley was dead: to begin with. There is no doubt whatever about that. The register of his burial was signed by the clergyman, the clerk, the undertaker, and the chief mourner. Scrooge signed it: and Scrooge's name was good upon 'Change, for anything he chose to put his hand to. Old Marley was as dead as a door-nail.

Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to do: once or twice she had peeped into the book her sister was reading, but it had no pictures or conversations in it, "and what is the use of a book," thought Alice "without pictures or conversations?" So she was considering in her own mind (as well as she could, for the hot day made her feel very sleepy and stupid), whether the pleasure of making a daisy-chain would be worth the trouble of getting up and picking the daisies, when suddenly a White Rabbit with pink eyes ran close by her.

There was nothing so very remarkable in that; nor did Alice think it so very much out of the way to hear the Rabbit say to itself, "Oh dear! Oh dear! I shall be late!" (when she thought it over afterwards, it occurred to her that she ought to have wondered at this, but at the time it all seemed quite natural); but when the Rabbit actually took a watch out of its waistcoat-pocket, and looked at it, and then hurried on, Alice started to her feet, for it flashed across her mind that she had never before seen a rabbit with either a waistcoat-pocket, or a watch to take out of it, and burning with curiosity, she ran across the field after it, and fortunately was just in time to see it pop down a large rabbit-hole under the hedge.

In the beginning God created the heaven and the earth. And the earth was without form, and void; and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. And God said, Let there be light: and there was light.
"""
TOP1_TOKENS = 1024


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port, path, body):
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def wait_ready(port, proc):
    for _ in range(600):
        if proc.poll() is not None:
            sys.exit(f"llama-server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.5)
    sys.exit("llama-server did not become ready")


def top2(step):
    return [[t["id"], t["logprob"]] for t in step["top_logprobs"][:2]]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", required=True, help="path of llama-server")
    ap.add_argument("--model", required=True, help="the Gemma 3 270M GGUF")
    ap.add_argument("--out", default="golden/gemma3_270m_reference.json")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    port = free_port()
    proc = subprocess.Popen(
        [a.server, "-m", a.model, "--host", "127.0.0.1", "--port", str(port), "-t", str(a.threads),
         "-c", "4096", "-np", "1", "--no-webui"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_ready(port, proc)
        tokenize = []
        for text in TOKENIZE_TEXTS:
            ids = post(port, "/tokenize", {"content": text, "add_special": False, "parse_special": False})["tokens"]
            tokenize.append({"text": text, "ids": ids})
        bos = post(port, "/tokenize", {"content": "", "add_special": True})["tokens"]

        greedy = []
        for prompt in GREEDY_PROMPTS:
            ids = bos + post(port, "/tokenize", {"content": prompt, "add_special": False, "parse_special": False})["tokens"]
            r = post(port, "/completion", {
                "prompt": ids, "n_predict": GREEDY_TOKENS, "temperature": 0, "n_probs": 2,
                "cache_prompt": False, "ignore_eos": False,
            })
            steps = r["completion_probabilities"]
            greedy.append({
                "prompt": prompt,
                "prompt_ids": ids,
                "ids": [s["id"] for s in steps],
                "top2": [top2(s) for s in steps],
            })
            print(f"greedy {prompt!r}: {r['content']!r}", file=sys.stderr)

        text_ids = bos + post(port, "/tokenize", {"content": TOP1_TEXT, "add_special": False, "parse_special": False})["tokens"]
        if len(text_ids) < TOP1_TOKENS + 1:
            sys.exit(f"the top-1 text has only {len(text_ids)} tokens; lengthen TOP1_TEXT")
        text_ids = text_ids[: TOP1_TOKENS + 1]
        top1 = []
        for k in range(1, TOP1_TOKENS + 1):
            r = post(port, "/completion", {
                "prompt": text_ids[:k], "n_predict": 1, "temperature": 0, "n_probs": 2,
                "cache_prompt": True,
            })
            top1.append(top2(r["completion_probabilities"][0]))
            if k % 128 == 0:
                print(f"top1: {k}/{TOP1_TOKENS}", file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait()

    v = subprocess.run([a.server, "--version"], capture_output=True, text=True)
    version = " ".join((v.stdout + v.stderr).split())
    out = {
        "model_sha256": sha256(a.model),
        "reference": "llama-server --version: " + version,
        "tokenize": tokenize,
        "greedy": greedy,
        "greedy_tie_logprob": 0.3,
        "top1": {
            "ids": text_ids,
            "top2": top1,
            "note": "top2[k] is llama.cpp's [id, logprob] top two after ids[..=k]",
        },
    }
    with open(a.out, "w") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
