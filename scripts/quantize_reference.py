#!/usr/bin/env python3
"""Record what llama.cpp's `llama-quantize` writes, tensor by tensor, for `ferrolm quantize`'s
golden test (`crates/cli/tests/quantize.rs`).

Source: the default model (SmolLM2-135M-Instruct Q4_1) dequantized to f32 by
`ferrolm quantize DEFAULT f32.gguf --type f32`; the f32 values are exact (Q4_1 → f32 is
lossless), so this source is the same on every machine. For each type, llama-quantize writes
a file from it, and this script records each tensor's type and the sha256 (first 16 hex digits) of its bytes in
`golden/quantize_llamacpp.json`. The test writes the same types with ferrolm and compares.

Usage (from the repository root, with llama.cpp built and the Python `gguf` package):

    python3 scripts/quantize_reference.py --ferrolm target/release/ferrolm \
        --llama-quantize /path/to/llama.cpp/build/bin/llama-quantize

The llama.cpp build used for the committed file is recorded in it (`llama_cpp`): pass
`--llama-cpp "DESCRIPTION"`.
"""
import argparse
import hashlib
import json
import os
import subprocess
import tempfile

import gguf  # pip install gguf
import numpy as np

# (name, llama-quantize type, extra llama-quantize flags): every type `ferrolm quantize` writes.
CASES = [
    ("f16", "F16", []),
    ("bf16", "BF16", []),
    ("q8_0", "Q8_0", []),
    ("q4_0", "Q4_0", []),
    ("q4_1", "Q4_1", []),
    ("q5_0", "Q5_0", []),
    ("q5_1", "Q5_1", []),
    ("q2_k", "Q2_K", []),
    ("q3_k_m", "Q3_K_M", []),
    ("q4_k_s", "Q4_K_S", []),
    ("q4_k_m", "Q4_K_M", []),
    ("q5_k_m", "Q5_K_M", []),
    ("q6_k", "Q6_K", []),
    # --pure: every weight its type, so the K-quant encoders run on more than ffn_down.
    ("q2_k --pure", "Q2_K", ["--pure"]),
    ("q3_k_s --pure", "Q3_K_S", ["--pure"]),
    ("q4_k_s --pure", "Q4_K_S", ["--pure"]),
    ("q5_k_s --pure", "Q5_K_S", ["--pure"]),
    # With an importance matrix (the synthetic one below): the weighted quantizers.
    ("q4_0 --imatrix", "Q4_0", ["--imatrix"]),
    ("q4_1 --imatrix", "Q4_1", ["--imatrix"]),
    ("q5_0 --imatrix", "Q5_0", ["--imatrix"]),
    ("q5_1 --imatrix", "Q5_1", ["--imatrix"]),
    ("q4_k_m --imatrix", "Q4_K_M", ["--imatrix"]),
    ("q2_k --pure --imatrix", "Q2_K", ["--pure", "--imatrix"]),
    ("q3_k_s --pure --imatrix", "Q3_K_S", ["--pure", "--imatrix"]),
    ("q5_k_s --pure --imatrix", "Q5_K_S", ["--pure", "--imatrix"]),
    ("q6_k --pure --imatrix", "Q6_K", ["--pure", "--imatrix"]),
]


def synthetic_imatrix(model_path, out):
    """An importance matrix in llama.cpp's GGUF format with made-up but fixed values, so that
    the weighted quantizers can be compared without depending on whose forward pass computed
    the activations: for every 2-D `blk.*` weight with C columns, column j weighs
    0.1 + ((37·j + 11·len(name)) mod 101) / 25, one chunk (counts = 1). The Rust test writes the
    same file (crates/cli/tests/quantize.rs, `synthetic_imatrix`)."""
    r = gguf.GGUFReader(model_path)
    w = gguf.GGUFWriter(out, arch="imatrix")
    for t in sorted(r.tensors, key=lambda t: t.name):
        if not t.name.startswith("blk.") or len(t.shape) != 2 or not t.name.endswith(".weight"):
            continue
        cols = int(t.shape[0])
        v = np.array([0.1 + ((37 * j + 11 * len(t.name)) % 101) / 25.0 for j in range(cols)], dtype=np.float32)
        w.add_tensor(t.name + ".in_sum2", v)
        w.add_tensor(t.name + ".counts", np.array([1.0], dtype=np.float32))
    w.add_array("imatrix.datasets", ["synthetic"])
    w.add_uint32("imatrix.chunk_count", 1)
    w.add_uint32("imatrix.chunk_size", 512)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tensors(path):
    r = gguf.GGUFReader(path)
    out = {}
    for t in r.tensors:
        data = np.asarray(t.data).tobytes()
        # "TYPE:first 16 hex digits of the sha256 of the tensor's bytes" (64 bits is plenty here).
        out[t.name] = f"{t.tensor_type.name}:{hashlib.sha256(data).hexdigest()[:16]}"
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ferrolm", default="target/release/ferrolm")
    ap.add_argument("--llama-quantize", required=True)
    ap.add_argument("--llama-cpp", default="unknown", help="which llama.cpp build, for the record")
    ap.add_argument("--out", default="golden/quantize_llamacpp.json")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        f32 = os.path.join(d, "f32.gguf")
        subprocess.run([a.ferrolm, "quantize", "smollm2-135m", f32, "--type", "f32", "--no-receipt"], check=True)
        result = {
            "source": "smollm2-135m (SmolLM2-135M-Instruct Q4_1) → `ferrolm quantize --type f32`",
            "source_sha256": hashlib.sha256(open(f32, "rb").read()).hexdigest(),
            "llama_cpp": a.llama_cpp,
            "cases": {},
        }
        imatrix = os.path.join(d, "imatrix.gguf")
        synthetic_imatrix(f32, imatrix)
        for name, ty, flags in CASES:
            out = os.path.join(d, "q.gguf")
            flags = [f for f in flags for f in ([f, imatrix] if f == "--imatrix" else [f])]
            subprocess.run([a.llama_quantize, *flags, f32, out, ty], check=True, capture_output=True)
            result["cases"][name] = tensors(out)
            print(name, len(result["cases"][name]), "tensors")
            os.remove(out)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
