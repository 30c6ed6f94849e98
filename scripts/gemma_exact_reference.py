#!/usr/bin/env python3
"""What the Gemma 3 270M GGUF computes in exact arithmetic: Hugging Face `transformers` loads the
file itself (every tensor dequantized to f32), runs the 1,024-token text of
golden/gemma3_270m_reference.json in f32 with no activation rounding and no KV cache, and this
script records, per position, the top two ids and their log-probs. The golden test
crates/cli/tests/gemma.rs holds ferrolm to it beside llama.cpp's answers: llama.cpp is one
quantized implementation of the file, this is the model the file describes.

Usage (from the repository root):
  python3 -m venv .venv-ref
  .venv-ref/bin/pip install torch transformers gguf accelerate
  .venv-ref/bin/python scripts/gemma_exact_reference.py \\
      --model ~/.cache/ferrolm/models/gemma-3-270m-q4_k_m.gguf \\
      [--out golden/gemma3_270m_exact.json]

The file's sha256 and the library versions are recorded with the answers.
"""

import argparse
import hashlib
import json
import os

import torch
import transformers
from transformers import AutoModelForCausalLM


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="gemma-3-270m-q4_k_m.gguf")
    ap.add_argument("--text", default="golden/gemma3_270m_reference.json",
                    help="the llama.cpp reference whose top1.ids are the text")
    ap.add_argument("--out", default="golden/gemma3_270m_exact.json")
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    model_path = os.path.abspath(os.path.expanduser(a.model))
    m = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(model_path), gguf_file=os.path.basename(model_path), dtype=torch.float32)
    m.eval()
    ids = json.load(open(a.text))["top1"]["ids"]
    assert len(ids) == 1025, "the text is BOS + 1,024 ids"
    # Positions 0..1023 predict ids 1..1024, as in the llama.cpp reference.
    with torch.no_grad():
        logits = m(torch.tensor([ids[:1024]])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    top = torch.topk(lp, 2, -1)
    out = {
        "model_sha256": sha256(model_path),
        "reference": f"transformers {transformers.__version__}, torch {torch.__version__}: "
                     "Gemma3ForCausalLM from the GGUF, weights dequantized to f32, f32 forward "
                     "over the whole text at once (eager, no cache), log-softmax in f64",
        "ids": ids,
        "top2": [[[int(i), round(float(l), 5)] for i, l in zip(ti, tl)]
                 for ti, tl in zip(top.indices.tolist(), top.values.tolist())],
    }
    with open(a.out, "w") as f:
        json.dump(out, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {a.out}: {len(out['top2'])} positions")


if __name__ == "__main__":
    main()
