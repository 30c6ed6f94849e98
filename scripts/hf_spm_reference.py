#!/usr/bin/env python3
"""A tiny Hugging Face Llama directory with a SentencePiece tokenizer, for the importer's test of
SentencePiece vocabularies (crates/cli/tests/hf_import.rs, `sentencepiece_*`).

Usage (from the repository root; needs torch, transformers and sentencepiece, e.g.
`pip install sentencepiece protobuf` into the venv of scripts/hf_import_reference.py):
  python scripts/hf_spm_reference.py [--out golden]

It trains a SentencePiece BPE model the way Llama 2's was trained (byte fallback, digits split,
identity normalization, whitespace kept, a dummy prefix) on the repo's tinyshakespeare text plus
a few CJK lines, with a 400-piece vocabulary, so emoji and most CJK characters fall back to
bytes. It writes two directories, each with a random 1-layer LlamaForCausalLM of that vocabulary
(the weights are not what is tested):
- golden/hf_tiny_spm_model/: `tokenizer.model` and a tokenizer_config.json, no tokenizer.json
  (how Llama 2 / Mistral checkpoints were first published);
- golden/hf_tiny_spm_json/: only `tokenizer.json`, the fast tokenizer `transformers` converts from
  that model (BPE with byte fallback, a Metaspace or Prepend/Replace normalizer).
and golden/hf_spm_reference.json: texts, the ids SentencePiece itself gives (BOS first), and
the cases where `transformers` gives other ids on either directory.
"""

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import sentencepiece as spm
import torch
import transformers

TEXTS = [
    "Hello world",
    "  two leading spaces, and  two  inside",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "Numbers: 3.14159, 2026-12-05 and 1000000.",
    "emoji 🦀🚀 and a smile 😀!",
    "中文测试：你好，世界。日本語のテキスト",
    "tabs\tand\u00a0odd spaces \u2028 and accents: café, naïve, Ærø",
    "ends with spaces   ",
    "",
]

CJK = "你好，世界。中文测试。我们的世界很大。日本語のテキストです。\n" * 50


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="golden")
    args = ap.parse_args()
    out = Path(args.out)
    corpus = Path("data/tinyshakespeare.txt").read_text()[:200_000] + CJK

    with tempfile.TemporaryDirectory() as tmp:
        cp = Path(tmp) / "corpus.txt"
        cp.write_text(corpus)
        prefix = str(Path(tmp) / "sp")
        spm.SentencePieceTrainer.train(
            input=str(cp),
            model_prefix=prefix,
            model_type="bpe",
            vocab_size=400,
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            allow_whitespace_only_pieces=True,
            character_coverage=0.9995,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            max_sentence_length=100_000,
            num_threads=1,
            minloglevel=2,
        )
        model_bytes = Path(prefix + ".model").read_bytes()

    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    n_vocab = sp.get_piece_size()
    ids = [[sp.bos_id()] + sp.encode(t) for t in TEXTS]

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=n_vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(cfg).to(torch.float16)

    dirs = {"model": out / "hf_tiny_spm_model", "json": out / "hf_tiny_spm_json"}
    for d in dirs.values():
        if d.exists():
            shutil.rmtree(d)
        model.save_pretrained(d, safe_serialization=True)
    d = dirs["model"]
    (d / "tokenizer.model").write_bytes(model_bytes)
    (d / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "add_eos_token": False,
                "legacy": True,
            },
            indent=2,
        )
        + "\n"
    )
    tok = transformers.AutoTokenizer.from_pretrained(d)
    tok.save_pretrained(dirs["json"])
    j = dirs["json"]
    for f in j.iterdir():
        if f.name not in ("tokenizer.json", "tokenizer_config.json", "config.json",
                          "generation_config.json", "model.safetensors"):
            f.unlink()

    # transformers' ids, recorded where they differ from SentencePiece's (transformers 5.x's
    # Metaspace drops one space of a run at the start of the text).
    differ = {}
    for name, d in dirs.items():
        t = transformers.AutoTokenizer.from_pretrained(d)
        for i, x in enumerate(TEXTS):
            got = t(x)["input_ids"]
            if got != ids[i]:
                differ.setdefault(name, []).append({"case": i, "transformers_ids": got})
                print(f"{name}: transformers differs from sentencepiece on {x!r}")
    ref = {
        "source": "scripts/hf_spm_reference.py",
        "sentencepiece": spm.__version__,
        "transformers": transformers.__version__,
        "n_vocab": n_vocab,
        "cases": [{"text": t, "ids": i} for t, i in zip(TEXTS, ids)],
        "transformers_differs": differ,
    }
    (out / "hf_spm_reference.json").write_text(json.dumps(ref, indent=1, ensure_ascii=False) + "\n")
    for x, i in zip(TEXTS, ids):
        print(repr(x), i[:12], "..." if len(i) > 12 else "")


if __name__ == "__main__":
    main()
