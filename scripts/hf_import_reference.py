#!/usr/bin/env python3
"""Tiny Hugging Face model directories for the importer's tests (crates/cli/tests/hf_import.rs).

Usage (from the repository root, after scripts/tiny_reference.py, with the same venv):
  .venv-ref/bin/python scripts/hf_import_reference.py [--out golden]

For each family of scripts/tiny_reference.py (Llama 3 with llama3 RoPE scaling, Mistral,
Qwen3, Phi-3, Phi-3 LongRoPE) it rebuilds the same tokenizer and model from the same seed,
checks that the model gives exactly the logits recorded in golden/tiny_<family>_logits.f32
(so these are the weights in golden/tiny_<family>.gguf), and writes what `transformers`
`save_pretrained` writes into golden/hf_tiny_<family>/: config.json, generation_config.json,
model.safetensors (2-D weights f16, which holds them exactly since they were rounded to f16;
vectors f32; Mistral's sharded with model.safetensors.index.json), tokenizer.json and
tokenizer_config.json (with add_bos_token, and a chat template for Qwen3). The test imports
each directory and compares the GGUF to golden/tiny_<family>.gguf, the file llama.cpp's
converter conventions give, tensor by tensor.

It adds one family that has no hand-written GGUF: `gemma3` (Gemma3ForCausalLM, three layers,
two with a sliding window of 8 and one global, per-head q/k norms, tied embeddings, a GPT-2
byte-level tokenizer; bf16 weights, rounded before the reference ran). Its logits on the same
40-token sequence go to golden/hf_tiny_gemma3_logits.f32, recorded in
golden/hf_import_reference.json with the ids, and the test compares ferrolm's logits on the
imported directory to them.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_reference as tr  # noqa: E402

GEMMA3 = dict(
    cls="Gemma3ForCausalLM",
    cfg="Gemma3TextConfig",
    arch="gemma3",
    pre="gpt-2",
    specials=["<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
    bos="<bos>",
    eos="<end_of_turn>",
    add_bos=True,
    extra=dict(
        num_hidden_layers=3,
        tie_word_embeddings=True,
        head_dim=16,
        sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        query_pre_attn_scalar=16,
        hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=1e-6,
    ),
)

QWEN3_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_dir(out: Path, fam: dict, model, tok, dtype=torch.float16, shard=None):
    out.mkdir(parents=True, exist_ok=True)
    for f in out.iterdir():
        f.unlink()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.data = p.data.to(dtype)
    kw = dict(safe_serialization=True)
    if shard:
        kw["max_shard_size"] = shard
    model.save_pretrained(out, **kw)
    ft = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=fam["bos"], eos_token=fam["eos"]
    )
    ft.save_pretrained(out)
    tcp = out / "tokenizer_config.json"
    tc = json.loads(tcp.read_text())
    tc["add_bos_token"] = fam["add_bos"]
    if fam["arch"] == "qwen3":
        tc["chat_template"] = QWEN3_TEMPLATE
    tcp.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
    for extra in ["special_tokens_map.json", "chat_template.jinja"]:
        if (out / extra).exists() and not (extra == "chat_template.jinja" and fam["arch"] == "qwen3"):
            (out / extra).unlink()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="golden")
    ap.add_argument("--data", default="data/tinyshakespeare.txt")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    text = Path(args.data).read_text(encoding="utf-8")[:200_000]
    corpus = [text] + tr.TOKENIZE_TEXTS * 4
    ref = json.loads((out / "tiny_reference.json").read_text())

    for name, fam in tr.FAMILIES.items():
        tok = tr.train_tokenizer(fam, corpus)
        meta = tr.tokenizer_metadata(tok, fam)
        vocab = len(meta["tokens"])
        bos, eos = meta["tokens"].index(fam["bos"]), meta["tokens"].index(fam["eos"])
        model = tr.build_model(fam, vocab, bos, eos, args.seed)
        ids = ref["families"][name]["ids"]
        want = np.frombuffer((out / f"tiny_{name}_logits.f32").read_bytes(), dtype="<f4").reshape(len(ids), -1)
        got = tr.logits_of(model, ids)
        diff = float(np.abs(got - want).max())
        assert diff == 0.0, f"{name}: rebuilt model differs from the recorded one by {diff}"
        save_dir(out / f"hf_tiny_{name}", fam, model, tok, shard="100KB" if name == "mistral" else None)
        print(f"{name}: golden/hf_tiny_{name}", file=sys.stderr)

    fam = GEMMA3
    tok = tr.train_tokenizer(fam, corpus)
    meta = tr.tokenizer_metadata(tok, fam)
    vocab = len(meta["tokens"])
    bos, eos = meta["tokens"].index(fam["bos"]), meta["tokens"].index(fam["eos"])
    model = tr.build_model(fam, vocab, bos, eos, args.seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(p.to(torch.bfloat16).float())
            else:
                # Gemma's norms multiply by (1 + w): keep w near 0, as trained models have it.
                p.copy_((p - 1.0).to(torch.bfloat16).float())
    ids = [bos] + tok.encode(tr.LOGITS_TEXT, add_special_tokens=False).ids
    ids = ids[: tr.SEQ_LEN]
    logits = tr.logits_of(model, ids)
    plain = tr.build_model(fam, vocab, bos, eos, args.seed, dict(sliding_window=4096,
                           layer_types=["full_attention"] * 3))
    plain.load_state_dict(model.state_dict())
    sensitivity = float(np.abs(tr.logits_of(plain, ids) - logits).max())
    save_dir(out / "hf_tiny_gemma3", fam, model, tok, dtype=torch.bfloat16)
    lb = logits.astype("<f4").tobytes()
    (out / "hf_tiny_gemma3_logits.f32").write_bytes(lb)
    res = dict(
        generator="scripts/hf_import_reference.py",
        versions=dict(torch=torch.__version__, transformers=transformers.__version__),
        families=dict(
            gemma3=dict(
                dir="hf_tiny_gemma3",
                ids=ids,
                logits_file="hf_tiny_gemma3_logits.f32",
                logits_sha256=tr.sha256(lb),
                logits_std=float(logits.std()),
                sensitivity=sensitivity,
                feature="sliding window 8 on two of three layers",
            )
        ),
    )
    (out / "hf_import_reference.json").write_text(json.dumps(res, indent=1) + "\n")
    print(f"gemma3: logits std {logits.std():.3f}, max|logit| {np.abs(logits).max():.2f}, "
          f"without the window max|Δ| {sensitivity:.3f}", file=sys.stderr)


if __name__ == "__main__":
    main()
