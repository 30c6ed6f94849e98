#!/usr/bin/env python3
"""ferrolm against llama.cpp across model size, context, threads and concurrency (issue 20).

Standard library only. Measures, side by side and interleaved (each cell runs ferrolm then
llama.cpp, the order swapped every other cell and round), on the same GGUF files:

  size      decode (and prefill 512) on the default SmolLM2-135M and on random-weight models of
            the shapes of SmolLM2-360M and SmolLM2-1.7B, in Q4_K_M, Q4_0 and Q8_0, at 1 and 2
            threads. Random weights: speed does not depend on the values (the text is noise).
            The random files are written by the repo's own GGUF writer
            (`cargo run -p ferrolm-gguf --example random_model`, f16) and quantized by
            `ferrolm quantize --no-receipt`; the 135M's types come from the shipped Q4_1 the same
            way (requantized: fine for speed, not for quality). Cached under --cache.
  context   decode after 0 (1 token), 1k, 4k and 8k (8000) tokens of context, 360M shape.
  threads   1 and 2 everywhere above.
  serving   `ferrolm serve` against `llama-server` at 1, 4, 16 and 32 concurrent streams, driven
            by scripts/loadgen.py --compare (which interleaves the two servers per level).

ferrolm's figures come from `ferrolm bench --json` (decode after --decode-depth tokens, prefill
of --prefill tokens from an empty cache, median of --reps after a warm-up); llama.cpp's from
`llama-bench -o json` (`-p N` prefill, `-n N -d D` decode after D tokens of context, mean of
-r runs after its warm-up), the newest llama.cpp on PyPI built by
scripts/build_llama_server.sh. Each engine figure is the median over --rounds.

The limits. The memory bandwidth is measured first by
`cargo run --release -p ferrolm-models --example bandwidth` (best-of-5 read of 3 GiB at 1 and 2
threads). Each decode figure gets its fraction of the bandwidth bound:
    (weight bytes + depth x KV bytes per token) x tok/s / read bandwidth at the same threads,
weight bytes being the GGUF's tensor bytes (the tied embedding counted once, as the output
head; each is read once per token). With weights that fit in the L3 (260-300 MiB here: the 135M, part
of the 360M) this fraction can pass 1, the bound being DRAM's. Each prefill figure gets its
fraction of an estimated int8 compute bound:
    MACs per token (layer matmuls + attention at the mean position) x tok/s /
    (threads x nominal GHz from /proc/cpuinfo x 2 VNNI instructions per cycle x 64 int8 MACs),
an AVX-512 VNNI estimate (two 512-bit FMA ports per core, as on Sapphire Rapids-class Xeons);
it ignores AMX, which this CPU reports and which is ~8x more (recorded in the JSON).

Writes --out/bench_matrix.json and three SVG plots (decode tok/s against size, context and
concurrency) and prints a table. --quick runs a small subset (135M and 360M, Q4_K_M and Q4_0,
contexts 0 and 1k, concurrency 1 and 4, one round) in a few minutes.

Usage:
  cargo build --release -p ferrolm
  cargo build --release -p ferrolm-gguf --example random_model
  cargo build --release -p ferrolm-models --example bandwidth
  scripts/build_llama_server.sh /work/llama/src 2            # llama-server + llama-bench
  python3 scripts/bench_matrix.py --llama-bin /work/llama/src/build/bin --out bench-matrix [--quick]
"""

import argparse
import datetime
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.expanduser("~/.cache/ferrolm/models/SmolLM2-135M-Instruct.Q4_1.gguf")

# Shapes from the SmolLM2 configs (hidden, layers, heads, kv heads, ffn); vocabulary 49152 and
# the tokenizer come from the 135M file. The 135M is the real model.
SHAPES = {
    "135M": dict(hidden=576, layers=30, heads=9, kv_heads=3, ffn=1536),
    "360M": dict(hidden=960, layers=32, heads=15, kv_heads=5, ffn=2560),
    "1.7B": dict(hidden=2048, layers=24, heads=32, kv_heads=32, ffn=8192),
}
TYPES = ["q4_k_m", "q4_0", "q8_0"]
VNNI_MACS_PER_CYCLE = 2 * 64  # two vpdpbusd zmm per cycle, 64 int8 MACs each
AMX_MACS_PER_CYCLE = 1024  # one TDPBUSD tile op: 16x64 int8 MACs per cycle (for the record)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd, timeout=1800, **kw):
    log("$ " + " ".join(str(c) for c in cmd))
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(map(str, cmd))}\n{p.stderr[-3000:]}")
    return p.stdout


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


# ---------------------------------------------------------------------------------------------
# the machine


def machine():
    info = {"cpus": os.cpu_count()}
    try:
        txt = open("/proc/cpuinfo").read()
        info["model"] = re.search(r"model name\s*:\s*(.*)", txt).group(1)
        info["mhz"] = float(re.search(r"cpu MHz\s*:\s*([\d.]+)", txt).group(1))
        flags = set(re.search(r"flags\s*:\s*(.*)", txt).group(1).split())
        info["isa"] = sorted(f for f in flags if f in (
            "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
            "avx512_fp16", "amx_int8", "amx_bf16", "amx_tile"))
        m = re.search(r"L3 cache:\s*(.*)", subprocess.run(["lscpu"], capture_output=True, text=True).stdout)
        info["l3"] = m.group(1).strip() if m else None
    except (OSError, AttributeError):
        pass
    return info


def compute_bound_macs(threads, mhz):
    """Estimated int8 multiply-accumulates per second on `threads` cores (AVX-512 VNNI)."""
    return threads * mhz * 1e6 * VNNI_MACS_PER_CYCLE


def bandwidth(args):
    exe = os.path.join(REPO, "target", "release", "examples", "bandwidth")
    if not os.path.exists(exe):
        sys.exit(f"{exe} missing: cargo build --release -p ferrolm-models --example bandwidth")
    doc = json.loads(run([exe, "--json", "--reps", "3" if args.quick else "5"]).strip().splitlines()[-1])
    return {r["threads"]: r for r in doc["results"]} | {"raw": doc}


# ---------------------------------------------------------------------------------------------
# the model files


def model_files(args, shapes, types):
    """{(shape, type): path}, making what is missing under --cache."""
    os.makedirs(args.cache, exist_ok=True)
    gen = os.path.join(REPO, "target", "release", "examples", "random_model")
    if not os.path.exists(gen):
        sys.exit(f"{gen} missing: cargo build --release -p ferrolm-gguf --example random_model")
    files = {}
    for shape in shapes:
        src = args.model if shape == "135M" else os.path.join(args.cache, f"random-{shape}.f16.gguf")
        for ty in types:
            out = os.path.join(args.cache, f"{'smollm2' if shape == '135M' else 'random'}-{shape}.{ty}.gguf")
            if not os.path.exists(out):
                if not os.path.exists(src):
                    s = SHAPES[shape]
                    run([gen, "--like", args.model, "--hidden", s["hidden"], "--layers", s["layers"],
                         "--heads", s["heads"], "--kv-heads", s["kv_heads"], "--ffn", s["ffn"], src])
                run([args.ferrolm, "quantize", "--no-receipt", "--threads", "2", "--type", ty, src, out])
            files[(shape, ty)] = out
        if shape != "135M" and os.path.exists(src):
            os.remove(src)  # the f16 intermediate (3.4 GB for 1.7B) is not needed once quantized
    return files


def weight_bytes(args, path):
    """Tensor bytes of a GGUF file, from `ferrolm info` ("... (272 tensors, 92.1 MiB)")."""
    out = run([args.ferrolm, "info", path])
    m = re.search(r"\((\d+) tensors, ([\d.]+) (MiB|GiB)\)", out)
    if not m:
        sys.exit(f"could not read the tensor bytes of {path} from `ferrolm info`:\n{out}")
    return float(m.group(2)) * (2**20 if m.group(3) == "MiB" else 2**30)


def layer_macs(shape):
    s = SHAPES[shape]
    kv = s["hidden"] // s["heads"] * s["kv_heads"]
    return s["layers"] * (2 * s["hidden"] ** 2 + 2 * s["hidden"] * kv + 3 * s["hidden"] * s["ffn"])


# Bytes per cached element of each KV cache type: f16; q8_0 (32 int8 + an f16 scale); q4_0 (32
# nibbles + an f16 scale). Both engines store these formats at these sizes.
KV_ELEM_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


def kv_bytes_per_token(shape, kv="f16"):
    s = SHAPES[shape]
    return 2 * s["layers"] * s["hidden"] // s["heads"] * s["kv_heads"] * KV_ELEM_BYTES[kv]  # K and V


# ---------------------------------------------------------------------------------------------
# one measurement per engine


def ferrolm_bench(args, path, threads, prefill, decode_tokens, depth, reps, kv="f16"):
    cmd = [args.ferrolm, "bench", "--json", "--model", path, "--threads", threads, "--reps", reps,
           "--decode-tokens", decode_tokens, "--decode-depth", max(depth, 1), "--prefill", prefill or 0,
           "--kv-type", kv]
    v = json.loads(run(cmd).strip().splitlines()[-1])
    return {"prefill": v.get(f"prefill_tps_{prefill}") if prefill else None, "decode": v["decode_tps"]}


def llama_bench(args, path, threads, prefill, decode_tokens, depth, reps, kv="f16"):
    exe = os.path.join(args.llama_bin, "llama-bench")
    cmd = [exe, "-m", path, "-t", threads, "-r", reps, "-o", "json",
           "-p", prefill or 0, "-n", decode_tokens, "-d", depth]
    if kv != "f16":
        # llama.cpp quantizes the V cache only with flash attention on.
        cmd += ["-ctk", kv, "-ctv", kv, "-fa", 1]
    rows = json.loads(run(cmd))
    out = {"prefill": None, "decode": None}
    for r in rows:
        if r["n_prompt"] > 0 and r["n_gen"] == 0:
            out["prefill"] = r["avg_ts"]
        elif r["n_gen"] > 0 and r["n_prompt"] == 0:
            out["decode"] = r["avg_ts"]
        out["build"] = f"{r.get('build_number')} {r.get('build_commit')}"
    return out


ENGINES = {"ferrolm": ferrolm_bench, "llama.cpp": llama_bench}


def measure_cells(args, cells, rounds):
    """Each cell: dict(shape, type, path, threads, prefill, decode_tokens, depth, reps).
    Interleaved: per round, per cell, both engines (order alternating). Fills cell[engine]."""
    for c in cells:
        for e in ENGINES:
            c[e] = {"prefill_all": [], "decode_all": [], "load1": []}
    for r in range(rounds):
        for i, c in enumerate(cells):
            order = list(ENGINES) if (r + i) % 2 == 0 else list(ENGINES)[::-1]
            for e in order:
                c[e]["load1"].append(os.getloadavg()[0])
                t0 = time.time()
                v = ENGINES[e](args, c["path"], c["threads"], c["prefill"], c["decode_tokens"], c["depth"],
                               c["reps"], c.get("kv", "f16"))
                log(f"  {e:9} {c['shape']:>4} {c['type']:6} t={c['threads']} depth={c['depth']:>5} "
                    f"kv={c.get('kv', 'f16')}: "
                    f"prefill {v['prefill']} decode {v['decode']} ({time.time() - t0:.0f} s)")
                c[e]["prefill_all"].append(v["prefill"])
                c[e]["decode_all"].append(v["decode"])
                if "build" in v:
                    c[e]["build"] = v["build"]
    for c in cells:
        for e in ENGINES:
            c[e]["prefill"] = median(c[e]["prefill_all"])
            c[e]["decode"] = median(c[e]["decode_all"])


def add_bounds(args, cells, bw, mach):
    wb = {}
    for c in cells:
        if c["path"] not in wb:
            wb[c["path"]] = weight_bytes(args, c["path"])
        c["weight_bytes"] = wb[c["path"]]
        c["kv_bytes_per_token"] = kv_bytes_per_token(c["shape"], c.get("kv", "f16"))
        bytes_per_token = c["weight_bytes"] + c["depth"] * c["kv_bytes_per_token"]
        gbs = bw[c["threads"]]["read_gbs"] * 1e9
        macs = layer_macs(c["shape"]) + (
            2 * SHAPES[c["shape"]]["layers"] * SHAPES[c["shape"]]["hidden"] * (c["prefill"] or 0) / 2)
        peak = compute_bound_macs(c["threads"], mach.get("mhz", 0) or 1)
        for e in ENGINES:
            d, p = c[e]["decode"], c[e]["prefill"]
            c[e]["decode_bw_fraction"] = d * bytes_per_token / gbs if d else None
            c[e]["prefill_compute_fraction"] = p * macs / peak if p else None
        f, l = c.get("ferrolm", {}), c.get("llama.cpp", {})
        c["ratio_decode"] = f["decode"] / l["decode"] if f.get("decode") and l.get("decode") else None
        c["ratio_prefill"] = f["prefill"] / l["prefill"] if f.get("prefill") and l.get("prefill") else None


# ---------------------------------------------------------------------------------------------
# serving


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_ready(base, proc, what):
    for _ in range(1200):
        if proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(base + "/v1/models", timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(0.25)
    sys.exit(f"{what} was not ready after 5 minutes")


def serving(args, path, levels, tmp):
    data = os.path.join(tmp, "serve-data")
    os.makedirs(data, exist_ok=True)
    procs, urls = [], []
    for e in ENGINES:
        port = free_port()
        if e == "ferrolm":
            cmd = [args.ferrolm, "serve", "--model", path, "--port", str(port), "--threads", "2",
                   "--data-dir", data, "--ctx", "8192", "--max-running", str(max(levels))]
        else:
            cmd = [os.path.join(args.llama_bin, "llama-server"), "-m", path, "--host", "127.0.0.1",
                   "--port", str(port), "-t", "2", "-c", "8192", "-np", str(max(levels)), "-kvu"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                      stderr=open(os.path.join(tmp, f"{e}-serve.log"), "w")))
        urls.append(f"http://127.0.0.1:{port}")
    try:
        for e, url, proc in zip(ENGINES, urls, procs):
            wait_ready(url, proc, e)
        out = os.path.join(tmp, "loadgen.json")
        load0 = os.getloadavg()[0]
        cmd = [sys.executable, os.path.join(REPO, "scripts", "loadgen.py"),
               *(["--compare", *urls, "--names", ",".join(ENGINES)] if len(urls) == 2 else ["--url", urls[0]]),
               "--concurrency", ",".join(map(str, levels)), "--requests-per-stream", "1",
               "--max-tokens", str(args.serve_tokens), "--rounds", str(args.serve_rounds), "--json", out]
        log("$ " + " ".join(cmd))
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if p.returncode not in (0, 1):
            sys.exit(f"loadgen failed:\n{p.stderr[-3000:]}")
        doc = json.load(open(out))
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    rows = []
    if len(urls) == 2:
        for row in doc["compare"]:
            t = row["output_tok_s"]
            rows.append({"streams": row["concurrency"], "ferrolm": t["a_median"], "llama.cpp": t["b_median"],
                         "ratio": t["ratio_a_over_b"], "errors": row["errors_a"] + row["errors_b"]})
    else:
        for c in levels:
            ts = [lv["output_tok_s"] for lv in doc["levels"] if lv["concurrency"] == c]
            rows.append({"streams": c, list(ENGINES)[0]: median(ts), "ratio": None,
                         "errors": sum(lv["errors"] for lv in doc["levels"] if lv["concurrency"] == c)})
    return {"levels": rows, "load1_start": load0, "load1_end": os.getloadavg()[0],
            "total_errors": doc["total_errors"]}


# ---------------------------------------------------------------------------------------------
# plots: plain SVG, categorical x, log or linear y


COLORS = ["#d62728", "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


def svg_plot(path, title, xlabel, ylabel, xcats, series, logy=False):
    """series: {name: [y or None per x category]}; dashed lines for llama.cpp."""
    import math
    w, h, ml, mr, mt, mb = 720, 420, 70, 200, 40, 50
    ys = [y for v in series.values() for y in v if y]
    if not ys:
        return
    lo, hi = min(ys), max(ys)
    if logy:
        lo, hi = 10 ** math.floor(math.log10(lo)), 10 ** math.ceil(math.log10(hi))
        f = lambda y: math.log10(y)  # noqa: E731
    else:
        # a round tick step (1, 2 or 5 × 10^k) and the axis up to the tick above the highest value
        raw = hi * 1.05 / 5
        mag = 10 ** math.floor(math.log10(raw))
        step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
        lo, hi = 0, step * math.ceil(hi * 1.05 / step)
        f = lambda y: y  # noqa: E731
    px = lambda i: ml + (i + 0.5) * (w - ml - mr) / len(xcats)  # noqa: E731
    py = lambda y: mt + (h - mt - mb) * (1 - (f(y) - f(lo)) / (f(hi) - f(lo)))  # noqa: E731
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
         f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
         f'<text x="{w / 2 - mr / 2}" y="22" text-anchor="middle" font-size="14">{title}</text>',
         f'<line x1="{ml}" y1="{h - mb}" x2="{w - mr}" y2="{h - mb}" stroke="black"/>',
         f'<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{h - mb}" stroke="black"/>',
         f'<text x="{(ml + w - mr) / 2}" y="{h - 12}" text-anchor="middle">{xlabel}</text>',
         f'<text x="16" y="{(mt + h - mb) / 2}" text-anchor="middle" '
         f'transform="rotate(-90 16 {(mt + h - mb) / 2})">{ylabel}</text>']
    ticks = ([lo * 10 ** k for k in range(int(round(math.log10(hi / lo))) + 1)] if logy
             else [step * k for k in range(int(round(hi / step)) + 1)])
    for t in ticks:
        o.append(f'<line x1="{ml}" y1="{py(t):.1f}" x2="{w - mr}" y2="{py(t):.1f}" stroke="#ddd"/>'
                 f'<text x="{ml - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    for i, c in enumerate(xcats):
        o.append(f'<text x="{px(i):.1f}" y="{h - mb + 18}" text-anchor="middle">{c}</text>')
    for k, (name, vals) in enumerate(series.items()):
        col = COLORS[k % len(COLORS)]
        dash = ' stroke-dasharray="6 4"' if "llama" in name else ""
        pts = [(px(i), py(y)) for i, y in enumerate(vals) if y]
        if len(pts) > 1:
            o.append(f'<polyline fill="none" stroke="{col}" stroke-width="2"{dash} points="'
                     + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + '"/>')
        for x, y in pts:
            o.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{col}"/>')
        ly = mt + 10 + 18 * k
        o.append(f'<line x1="{w - mr + 10}" y1="{ly}" x2="{w - mr + 34}" y2="{ly}" stroke="{col}" '
                 f'stroke-width="2"{dash}/><text x="{w - mr + 40}" y="{ly + 4}">{name}</text>')
    o.append("</svg>")
    with open(path, "w") as fh:
        fh.write("\n".join(o) + "\n")


def plots(args, doc):
    size_cells = doc["size"]
    shapes = [s for s in SHAPES if any(c["shape"] == s for c in size_cells)]
    series = {}
    for c in size_cells:
        if c["threads"] != 2:
            continue
        for e in ENGINES:
            series.setdefault(f"{e} {c['type']}", [None] * len(shapes))[shapes.index(c["shape"])] = c[e]["decode"]
    svg_plot(os.path.join(args.out, "bench_matrix_size.svg"), "Decode tok/s against model size (2 threads)",
             "model shape (135M real; 360M, 1.7B random weights)", "decode tok/s (log)", shapes, series, logy=True)
    ctx_cells = doc["context"]
    depths = sorted({c["depth"] for c in ctx_cells})
    series = {}
    for c in ctx_cells:
        for e in ENGINES:
            kv = c.get("kv", "f16")
            series.setdefault(f"{e} {c['type']} {c['threads']}t{'' if kv == 'f16' else ' kv ' + kv}",
                              [None] * len(depths))[depths.index(c["depth"])] = \
                c[e]["decode"]
    svg_plot(os.path.join(args.out, "bench_matrix_context.svg"),
             f"Decode tok/s against context ({ctx_cells[0]['shape'] if ctx_cells else ''} shape)",
             "tokens of context before decoding", "decode tok/s", [str(d) for d in depths], series)
    series = {}
    levels = None
    for name, s in doc["serving"].items():
        levels = [r["streams"] for r in s["levels"]]
        for e in ENGINES:
            series[f"{e} {name}"] = [r.get(e) for r in s["levels"]]
    if levels:
        svg_plot(os.path.join(args.out, "bench_matrix_concurrency.svg"),
                 "Server output tok/s against concurrent streams (2 threads)", "concurrent streams",
                 "aggregate output tok/s", [str(x) for x in levels], series)


# ---------------------------------------------------------------------------------------------


def fmt(x, d=1):
    return "-" if x is None else f"{x:.{d}f}"


def table(doc):
    lines = ["| what | shape | type | threads | ctx | KV | ferrolm tok/s | llama.cpp tok/s | ratio | "
             "ferrolm / llama.cpp fraction of bound |", "|---|---|---|---|---|---|---|---|---|---|"]
    for part in ("size", "context"):
        for c in doc[part]:
            for kind, key, frac in (("prefill", "prefill", "prefill_compute_fraction"),
                                    ("decode", "decode", "decode_bw_fraction")):
                fe, le = c.get("ferrolm", {}), c.get("llama.cpp", {})
                f, l = fe.get(key), le.get(key)
                if f is None and l is None:
                    continue
                r = f / l if f and l else None
                lines.append(
                    f"| {kind}{' ' + str(c['prefill']) if kind == 'prefill' else ''} | {c['shape']} | {c['type']} | "
                    f"{c['threads']} | {c['depth'] if kind == 'decode' else 0} | {c.get('kv', 'f16')} | "
                    f"{fmt(f)} | {fmt(l)} | {fmt(r, 2)} | "
                    f"{fmt(fe.get(frac), 2)} / {fmt(le.get(frac), 2)} |")
    for name, s in doc["serving"].items():
        for r in s["levels"]:
            lines.append(f"| serve {r['streams']} streams | {name} | | 2 | | | {fmt(r.get('ferrolm'))} | "
                         f"{fmt(r.get('llama.cpp'))} | {fmt(r['ratio'], 2)} | |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ferrolm", default=os.path.join(REPO, "target", "release", "ferrolm"))
    ap.add_argument("--llama-bin", default="/work/llama/src/build/bin",
                    help="directory holding llama-bench and llama-server (default %(default)s)")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="the 135M GGUF (tokenizer source too)")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/ferrolm/bench-matrix"),
                    help="where generated models are kept (default %(default)s)")
    ap.add_argument("--out", default="bench-matrix", help="directory for the JSON and SVGs")
    ap.add_argument("--quick", action="store_true", help="a small subset, one round (a few minutes)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 2; --quick 1)")
    ap.add_argument("--shapes", default=None, help="comma-separated subset of 135M,360M,1.7B")
    ap.add_argument("--types", default=None, help="comma-separated subset of q4_k_m,q4_0,q8_0")
    ap.add_argument("--kv-types", default="f16",
                    help="KV cache types the context part runs, comma separated (default f16; "
                         "also q8_0, q4_0: llama.cpp runs them with flash attention on)")
    ap.add_argument("--depths", default=None, help="decode contexts (default 0,1024,4096,8000; --quick 0,1024)")
    ap.add_argument("--streams", default=None, help="server concurrency levels (default 1,4,16,32; --quick 1,4)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: size,context,serving")
    ap.add_argument("--engines", default="ferrolm,llama.cpp",
                    help="which engines to measure (default both; one alone when the other is not built)")
    ap.add_argument("--prepare", action="store_true",
                    help="only write the model files under --cache (no llama.cpp needed), then stop")
    ap.add_argument("--serve-tokens", type=int, default=64, help="max_tokens per server request")
    ap.add_argument("--serve-rounds", type=int, default=1)
    args = ap.parse_args()
    rounds = args.rounds or (1 if args.quick else 2)
    shapes = args.shapes.split(",") if args.shapes else (["135M", "360M"] if args.quick else list(SHAPES))
    types = args.types.split(",") if args.types else (["q4_k_m", "q4_0"] if args.quick else TYPES)
    if args.prepare:
        for path in model_files(args, shapes, types).values():
            print(path)
        return
    global ENGINES
    want = args.engines.split(",")
    if not want or any(e not in ENGINES for e in want):
        sys.exit(f"--engines: a comma-separated subset of {','.join(ENGINES)}")
    ENGINES = {e: f for e, f in ENGINES.items() if e in want}
    exes = [args.ferrolm] if "ferrolm" in ENGINES else []
    if "llama.cpp" in ENGINES:
        exes += [os.path.join(args.llama_bin, "llama-bench"), os.path.join(args.llama_bin, "llama-server")]
    for exe in exes:
        if not os.path.exists(exe):
            sys.exit(f"{exe} missing (cargo build --release -p ferrolm; scripts/build_llama_server.sh DIR)")
    if not os.path.exists(args.model):
        sys.exit(f"{args.model} missing: run `ferrolm pull` (or pass --model)")
    depths = ([int(x) for x in args.depths.split(",")] if args.depths
              else [0, 1024] if args.quick else [0, 1024, 4096, 8000])
    levels = ([int(x) for x in args.streams.split(",")] if args.streams
              else [1, 4] if args.quick else [1, 4, 16, 32])
    skip = set(filter(None, args.skip.split(",")))
    kv_types = args.kv_types.split(",")
    if not kv_types or any(k not in KV_ELEM_BYTES for k in kv_types):
        sys.exit(f"--kv-types: a comma-separated subset of {','.join(KV_ELEM_BYTES)}")
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()

    mach = machine()
    commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    log(f"machine: {mach}")
    bw = bandwidth(args)
    log(f"bandwidth: {bw['raw']}")
    files = model_files(args, shapes, types)
    doc = {"tool": "bench_matrix.py", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "commit": commit, "machine": mach, "bandwidth": bw["raw"],
           "compute_bound": {"estimate": "threads x nominal MHz x 2 vpdpbusd zmm/cycle x 64 int8 MACs",
                             "vnni_macs_per_s_1t": compute_bound_macs(1, mach.get("mhz", 0)),
                             "amx_macs_per_s_1t_for_reference": mach.get("mhz", 0) * 1e6 * AMX_MACS_PER_CYCLE},
           "quick": args.quick, "rounds": rounds, "engines": list(ENGINES), "random_weights": "360M and 1.7B shapes: random values",
           "size": [], "context": [], "serving": {}}

    if "size" not in skip:
        cells = []
        for shape in shapes:
            big = shape == "1.7B"
            for ty in types:
                for t in (1, 2):
                    # 1.7B trimmed to fit the budget: prefill only at 2 threads, 64 decode tokens, 1 rep
                    cells.append(dict(shape=shape, type=ty, path=files[(shape, ty)], threads=t,
                                      prefill=None if big and t == 1 else 512,
                                      decode_tokens=64 if big else 128, depth=0,
                                      reps=1 if big or args.quick else 2))
        measure_cells(args, cells, rounds)
        add_bounds(args, cells, bw, mach)
        doc["size"] = cells
    if "context" not in skip:
        shape = "360M" if "360M" in shapes else shapes[0]
        ty = "q4_k_m" if "q4_k_m" in types else types[0]
        cells = [dict(shape=shape, type=ty, path=files[(shape, ty)], threads=t, prefill=None,
                      decode_tokens=64, depth=d, reps=1, kv=kv)
                 for kv in kv_types for t in ((2,) if args.quick else (1, 2)) for d in depths]
        measure_cells(args, cells, 1)
        add_bounds(args, cells, bw, mach)
        doc["context"] = cells
    if "serving" not in skip:
        with tempfile.TemporaryDirectory() as tmp:
            doc["serving"]["135M Q4_1"] = serving(args, args.model, levels, tmp)
            if not args.quick and "360M" in shapes and "q4_k_m" in types:
                doc["serving"]["360M Q4_K_M"] = serving(args, files[("360M", "q4_k_m")], levels, tmp)
    doc["wall_s"] = time.time() - t_start
    doc["load1_end"] = os.getloadavg()
    for part in ("size", "context"):
        for c in doc[part]:
            c["path"] = os.path.basename(c["path"])
    with open(os.path.join(args.out, "bench_matrix.json"), "w") as fh:
        json.dump(doc, fh, indent=1)
    plots(args, doc)
    print(table(doc))
    print(f"\nbandwidth (best of N, read): " + ", ".join(
        f"{r['threads']}t {r['read_gbs']} GB/s" for r in doc["bandwidth"]["results"]))
    print(f"wall {doc['wall_s'] / 60:.1f} min; wrote {args.out}/bench_matrix.json and SVGs")


if __name__ == "__main__":
    main()
