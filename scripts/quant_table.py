#!/usr/bin/env python3
"""The seed's quantization table, measured: for each type, size, prefill and decode speed,
perplexity and KL divergence against f32, for `ferrolm quantize`'s file and llama.cpp's
`llama-quantize` file of the same f32 source, all measured by the same tools.

Usage (from the repository root):
  python3 scripts/quant_table.py --llama-quantize PATH [--ferrolm target/release/ferrolm]
      [--llama-bench PATH] [--types f32,f16,q8_0,q6_k,q5_k_m,q4_k_m,q4_0]
      [--text data/tinyshakespeare.txt] [--tokens 4096] [--threads 2] [--reps 3]
      [--json-out FILE]

* Source: the default model (SmolLM2-135M-Instruct Q4_1) dequantized to f32 by
  `ferrolm quantize smollm2-135m f32.gguf --type f32` (lossless: Q4_1 values are exact f32s).
  Its own quality loss from the original bf16 weights is not in these figures: every row is
  measured against this f32 file.
* Quality: `ferrolm eval kld --model FILE --base f32.gguf --file TEXT --tokens N` (windows of
  512, positions 1..511 scored), the last 10% of tinyshakespeare by default (the held-out
  split; not the calibration text the receipts use, which is its last 20 KB).
* Speed: `ferrolm bench --json --threads T --reps R` (prefill of 512 tokens, decode of 128)
  on each file; with --llama-bench also llama.cpp's own `llama-bench -p 512 -n 128` on the
  same file, run right after, so the two share the machine's load.
* Sizes: the file's bytes.

Needs only the Python standard library.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import tempfile


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return r


def last_json(stdout):
    lines = [l for l in stdout.splitlines() if l.startswith("{") or l.startswith("[")]
    return json.loads(lines[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ferrolm", default="target/release/ferrolm")
    ap.add_argument("--llama-quantize", required=True)
    ap.add_argument("--llama-bench")
    ap.add_argument("--types", default="f32,f16,q8_0,q6_k,q5_k_m,q4_k_m,q4_0")
    ap.add_argument("--text", default="data/tinyshakespeare.txt")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json-out")
    a = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as d:
        # The held-out tail (last 10%) of the text.
        with open(a.text, encoding="utf-8") as f:
            text = f.read()
        held_out = os.path.join(d, "held_out.txt")
        with open(held_out, "w", encoding="utf-8") as f:
            f.write(text[int(len(text) * 0.9):])
        f32 = os.path.join(d, "f32.gguf")
        run([a.ferrolm, "quantize", "smollm2-135m", f32, "--type", "f32", "--no-receipt"])
        for ty in a.types.split(","):
            files = {}
            if ty == "f32":
                files["source"] = f32
            else:
                fe = os.path.join(d, f"ferrolm-{ty}.gguf")
                lc = os.path.join(d, f"llama-{ty}.gguf")
                run([a.ferrolm, "quantize", f32, fe, "--type", ty, "--no-receipt"])
                run([a.llama_quantize, f32, lc, ty.upper()])
                files["ferrolm"] = fe
                files["llama.cpp"] = lc
            for who, path in files.items():
                row = {"type": ty, "quantizer": who, "bytes": os.path.getsize(path)}
                k = last_json(run([a.ferrolm, "eval", "kld", "--model", path, "--base", f32,
                                   "--file", held_out, "--tokens", str(a.tokens), "--json",
                                   "--threads", str(a.threads)]).stdout)
                row.update({f"{key}": k[key] for key in ("kld_mean", "kld_p99", "top1_agreement", "ppl", "tokens")})
                b = last_json(run([a.ferrolm, "bench", "--json", "--model", path, "--threads",
                                   str(a.threads), "--reps", str(a.reps)]).stdout)
                row["ferrolm_prefill_512"] = b["prefill_tps_512"]
                row["ferrolm_decode"] = b["decode_tps"]
                if a.llama_bench:
                    lb = json.loads(run([a.llama_bench, "-m", path, "-p", "512", "-n", "128", "-t",
                                         str(a.threads), "-r", str(a.reps), "-o", "json"]).stdout)
                    for r in lb:
                        if r.get("n_prompt") == 512 and r.get("n_gen") == 0:
                            row["llamacpp_prefill_512"] = r["avg_ts"]
                        if r.get("n_gen") == 128 and r.get("n_prompt") == 0:
                            row["llamacpp_decode"] = r["avg_ts"]
                rows.append(row)
                print(json.dumps(row), flush=True)

    base = next(r for r in rows if r["type"] == "f32")
    print()
    print(f"| type | quantizer | size MB | × f32 | KLD mean | KLD p99 | top-1 | PPL (f32 {base['ppl']:.3f}) "
          f"| ferrolm prefill-512 / decode tok/s | llama.cpp prefill-512 / decode tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lc = (f"{r['llamacpp_prefill_512']:.0f} / {r['llamacpp_decode']:.0f}"
              if "llamacpp_decode" in r else "–")
        print(f"| {r['type']} | {r['quantizer']} | {r['bytes'] / 1e6:.1f} | {r['bytes'] / base['bytes']:.3f} "
              f"| {r['kld_mean']:.5f} | {r['kld_p99']:.4f} | {100 * r['top1_agreement']:.2f}% | {r['ppl']:.3f} "
              f"| {r['ferrolm_prefill_512']:.0f} / {r['ferrolm_decode']:.0f} | {lc} |")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"date": datetime.datetime.utcnow().isoformat() + "Z", "machine": platform.uname()._asdict(),
                       "load": os.getloadavg(), "args": vars(a), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
