#!/usr/bin/env python3
"""llama.cpp side of the ferrolm vs llama.cpp benchmark (see scripts/bench.py).

Measures llama.cpp (through the `llama_cpp` ctypes bindings of the PyPI package
`llama-cpp-python`, low-level API, no `Llama` wrapper) on one GGUF model with
T threads (n_threads = n_threads_batch = T) and prints ONE JSON line:

  {"engine": "llama.cpp", "threads": T,
   "prefill_tps_128": .., "prefill_tps_512": .., "decode_tps": ..,
   "peak_rss_mb": .., "python_baseline_rss_mb": .., ...metadata...}

Every measurement runs in a fresh child process (this parent process never
imports llama_cpp or numpy):

  1. timing worker: loads the model, creates a context (n_ctx=1024,
     n_batch=512, n_ubatch=512, only the last position produces logits, i.e.
     logits_all=False) and measures
       * prefill_tps_N (N = 128, 512): one llama_decode() of the first N
         tokens of the prompt text, KV cache cleared before each run;
         1 warm-up + median of --reps-prefill runs (default 3); tps = N / seconds.
       * decode_tps: KV cleared, a --decode-prompt-token (default 16) prompt is
         prefilled (not timed), then --decode-tokens (default 128) greedy steps,
         each one llama_decode() of a single token + argmax over the logits
         (the same definition as `ferrolm bench`); the loop of steps is timed;
         tps = steps / seconds; 1 warm-up + median of --reps-decode runs.
  2. rss worker: a separate fresh process that loads the model and runs the
     same workload; peak_rss_mb = its getrusage(RUSAGE_SELF).ru_maxrss / 1024
     (KiB -> MiB; includes the Python interpreter, numpy and the llama_cpp
     import, and the mmapped model pages that were touched).
  3. baseline worker: a fresh process that only does `import llama_cpp`;
     python_baseline_rss_mb = its ru_maxrss / 1024. peak_rss_mb minus this is
     roughly what llama.cpp itself costs (model + context + compute buffers).

Prompt tokens: the text file (default: the repository's
data/tinyshakespeare.txt) is read from the
start (first 16 KiB), tokenized with the model's own tokenizer (llama.cpp,
add_special=False, parse_special=False: no BOS) and truncated to N tokens.

Usage (from the repository root, with the bench venv):
  .venv-bench/bin/python scripts/bench_llamacpp.py --model PATH.gguf --threads 1
  .venv-bench/bin/python scripts/bench_llamacpp.py --model PATH.gguf --threads 2 --reps-prefill 5 --reps-decode 5

Install (what was used; CPU backend only, native CPU flags; took 491 s (download + build) with 2 busy cores):
  python3 -m venv .venv-bench
  MAKEFLAGS=-j2 CMAKE_BUILD_PARALLEL_LEVEL=2 \\
  CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF" \\
    .venv-bench/bin/pip install --no-cache-dir llama-cpp-python==0.3.36
(0.3.36 vendors llama.cpp ggml-org/llama.cpp@0c1e57098.)
"""

import argparse
import json
import os
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TEXT = os.path.join(REPO_ROOT, "data", "tinyshakespeare.txt")
TEXT_BYTES = 16384  # enough for > 512 tokens

N_CTX = 1024
N_BATCH = 512
N_UBATCH = 512
PREFILL_LENS = (128, 512)


# --------------------------------------------------------------------------- helpers

def _rss_mb():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _vm_hwm_mb():
    """VmHWM of this process (per address space, not carried over exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _median(xs):
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


# --------------------------------------------------------------------------- worker side

class Engine:
    """Minimal low-level llama.cpp session: model + one context."""

    def __init__(self, model_path, threads, use_mmap=True, flash_attn="auto"):
        import ctypes

        import llama_cpp as L

        self.L = L
        self.ctypes = ctypes
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.use_mmap = bool(use_mmap)
        mp.n_gpu_layers = 0
        self.model = L.llama_model_load_from_file(model_path.encode(), mp)
        if not self.model:
            raise SystemExit(f"llama.cpp could not load model {model_path!r}")
        cp = L.llama_context_default_params()
        cp.n_ctx = N_CTX
        cp.n_batch = N_BATCH
        cp.n_ubatch = N_UBATCH
        cp.n_seq_max = 1
        cp.n_threads = threads
        cp.n_threads_batch = threads
        cp.embeddings = False
        if hasattr(cp, "flash_attn_type"):
            cp.flash_attn_type = {"auto": -1, "off": 0, "on": 1}[flash_attn]
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise SystemExit("llama.cpp could not create a context")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.mem = L.llama_get_memory(self.ctx)

    def tokenize(self, text):
        L = self.L
        b = text.encode("utf-8")
        cap = len(b) + 16
        arr = (L.llama_token * cap)()
        n = L.llama_tokenize(self.vocab, b, len(b), arr, cap, False, False)
        if n < 0:
            raise SystemExit(f"tokenize failed ({n})")
        return list(arr[:n])

    def clear(self):
        self.L.llama_memory_clear(self.mem, True)

    def decode(self, tokens):
        """llama_decode of `tokens` as one batch appended to sequence 0; returns seconds."""
        L = self.L
        arr = (L.llama_token * len(tokens))(*tokens)
        batch = L.llama_batch_get_one(arr, len(tokens))
        t0 = time.perf_counter()
        rc = L.llama_decode(self.ctx, batch)
        L.llama_synchronize(self.ctx)
        dt = time.perf_counter() - t0
        if rc != 0:
            raise SystemExit(f"llama_decode returned {rc}")
        return dt

    def argmax_last(self):
        import numpy as np

        ptr = self.L.llama_get_logits_ith(self.ctx, -1)
        if not ptr:
            raise SystemExit("no logits for the last position")
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))))

    # ---- the workload

    def prefill_tps(self, prompt, n, reps):
        toks = prompt[:n]
        if len(toks) < n:
            raise SystemExit(f"prompt text gives only {len(prompt)} tokens, need {n}")
        runs = []
        for i in range(reps + 1):  # run 0 = warm-up
            self.clear()
            dt = self.decode(toks)
            if i:
                runs.append(n / dt)
        return runs

    def decode_tps(self, prompt, n_prompt, steps, reps):
        runs = []
        for i in range(reps + 1):  # run 0 = warm-up
            self.clear()
            self.decode(prompt[:n_prompt])  # not timed
            tok = self.argmax_last()
            t0 = time.perf_counter()
            for _ in range(steps):
                self.decode([tok])
                tok = self.argmax_last()
            total = time.perf_counter() - t0
            if i:
                runs.append(steps / total)
        return runs


def worker(args):
    if args.worker == "baseline":
        import llama_cpp  # noqa: F401  (the import alone is what is measured)

        print(json.dumps({"ru_maxrss_mb": round(_rss_mb(), 2), "vm_hwm_mb": _vm_hwm_mb()}))
        return
    with open(args.text, encoding="utf-8") as f:
        text = f.read(TEXT_BYTES)
    eng = Engine(args.model, args.threads, use_mmap=not args.no_mmap, flash_attn=args.flash_attn)
    prompt = eng.tokenize(text)
    out = {}
    for n in PREFILL_LENS:
        runs = eng.prefill_tps(prompt, n, args.reps_prefill)
        out[f"prefill_tps_{n}"] = _median(runs)
        out[f"prefill_tps_{n}_runs"] = [round(r, 2) for r in runs]
    runs = eng.decode_tps(prompt, args.decode_prompt, args.decode_tokens, args.reps_decode)
    out["decode_tps"] = _median(runs)
    out["decode_tps_runs"] = [round(r, 2) for r in runs]
    out["ru_maxrss_mb"] = round(_rss_mb(), 2)
    out["vm_hwm_mb"] = _vm_hwm_mb()
    out["n_prompt_tokens_available"] = len(prompt)
    import llama_cpp

    out["llama_cpp_python"] = getattr(llama_cpp, "__version__", "?")
    out["system_info"] = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    print(json.dumps(out))


# --------------------------------------------------------------------------- parent side

def run_worker(kind, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind,
           "--model", args.model, "--threads", str(args.threads), "--text", args.text,
           "--reps-prefill", str(args.reps_prefill), "--reps-decode", str(args.reps_decode),
           "--decode-tokens", str(args.decode_tokens), "--decode-prompt", str(args.decode_prompt),
           "--flash-attn", args.flash_attn]
    if args.no_mmap:
        cmd.append("--no-mmap")
    env = dict(os.environ)
    # make sure nothing overrides the thread count we ask for
    for k in ("OMP_NUM_THREADS", "GOMP_CPU_AFFINITY", "OMP_PROC_BIND"):
        env.pop(k, None)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if p.returncode != 0:
        sys.stderr.write(p.stderr[-4000:])
        raise SystemExit(f"bench_llamacpp: {kind} worker failed (exit {p.returncode})")
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if not lines:
        sys.stderr.write(p.stdout[-2000:] + p.stderr[-2000:])
        raise SystemExit(f"bench_llamacpp: {kind} worker printed no JSON")
    return json.loads(lines[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="GGUF file")
    ap.add_argument("--threads", type=int, required=True, help="n_threads = n_threads_batch")
    ap.add_argument("--text", default=DEFAULT_TEXT, help="prompt text file (default: %(default)s)")
    ap.add_argument("--reps-prefill", type=int, default=3, help="timed prefill runs per length (default 3, as ferrolm bench)")
    ap.add_argument("--reps-decode", type=int, default=3, help="timed decode runs (default 3, as ferrolm bench)")
    ap.add_argument("--decode-tokens", type=int, default=128, help="decode steps per run (default 128)")
    ap.add_argument("--decode-prompt", type=int, default=16, help="prompt tokens before decoding (default 16)")
    ap.add_argument("--flash-attn", choices=("auto", "on", "off"), default="auto",
                    help="llama.cpp flash_attn_type (default auto = llama.cpp's default)")
    ap.add_argument("--no-mmap", action="store_true", help="load weights into RAM instead of mmap")
    ap.add_argument("--verbose", action="store_true", help="also print per-run figures to stderr")
    ap.add_argument("--worker", choices=("timing", "rss", "baseline"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads < 1:
        ap.error("--threads must be >= 1")

    if args.worker:
        worker(args)
        return
    if not os.path.isfile(args.model):
        raise SystemExit(f"bench_llamacpp: model not found: {args.model}")
    if not os.path.isfile(args.text):
        raise SystemExit(f"bench_llamacpp: prompt text not found: {args.text} (use --text)")

    timing = run_worker("timing", args)
    rss = run_worker("rss", args)
    base = run_worker("baseline", args)
    if args.verbose:
        sys.stderr.write(json.dumps({"timing": timing, "rss": rss, "baseline": base}, indent=1) + "\n")
    out = {
        "engine": "llama.cpp",
        "threads": args.threads,
        "prefill_tps_128": round(timing["prefill_tps_128"], 2),
        "prefill_tps_512": round(timing["prefill_tps_512"], 2),
        "decode_tps": round(timing["decode_tps"], 2),
        "peak_rss_mb": round(rss["ru_maxrss_mb"], 1),
        "python_baseline_rss_mb": round(base["ru_maxrss_mb"], 1),
        "llama_cpp_python": timing["llama_cpp_python"],
        "model": os.path.basename(args.model),
        "mmap": not args.no_mmap,
        "flash_attn": args.flash_attn,
        "reps": {"prefill": args.reps_prefill, "decode": args.reps_decode},
        # the individual timed runs behind each median (timing worker)
        "runs": {k[:-5]: timing[k] for k in timing if k.endswith("_runs")},
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
