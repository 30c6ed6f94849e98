#!/usr/bin/env python3
"""ferrolm train against PyTorch on nanoGPT's shakespeare-char CPU configuration, side by side.

Each round runs, one after the other on the same threads:
  1. `ferrolm train` (char tokenizer, the default config = nanoGPT's CPU run in the Llama
     architecture), 2,000 steps, val loss over 200 fixed batches of 12 at the end;
  2. `scripts/nanogpt_baseline.py --arch gpt` (nanoGPT's GPT in PyTorch, same hyperparameters);
  3. optionally `--arch llama` (ferrolm's architecture in PyTorch) with --with-llama.
Time per iteration on both sides is the median wall time of iterations 10.. (ferrolm: the "ms"
of each step in metrics.jsonl; PyTorch: the script's own per-iteration clock), evaluations
excluded. Rounds interleave the runtimes so that load from other tenants hits both; the
summary gives each runtime's median over rounds and ferrolm / PyTorch.

Then (once) the run is exported as q8_0 GGUF and loaded by llama.cpp's llama-server (when
LLAMA_SERVER points at one), whose greedy continuation is printed beside ferrolm's.

    python3 scripts/train_bench.py --rounds 3 --threads 2 [--python /work/torch-venv/bin/python]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def ferrolm_run(args, out):
    cmd = [args.ferrolm, "train", "--data", args.data, "--tokenizer", args.tokenizer, "--out", out,
           "--iters", str(args.iters), "--eval-every", str(args.iters), "--eval-iters", "200",
           "--threads", str(args.threads), "--json"]
    t0 = time.time()
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    ms = []
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for line in f:
            v = json.loads(line)
            if "ms" in v and v["step"] >= 10:
                ms.append(v["ms"])
    summary["ms_median"] = statistics.median(ms)
    summary["wall_s"] = time.time() - t0
    return summary


def torch_run(args, arch):
    cmd = [args.python, "scripts/nanogpt_baseline.py", "--threads", str(args.threads), "--iters",
           str(args.iters), "--eval-iters", "200", "--arch", arch, "--json", "--data", args.data]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def loadavg():
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def llama_cpp_check(args, run_dir):
    exe = os.environ.get("LLAMA_SERVER", "/work/llama.cpp-src/build/bin/llama-server")
    gguf = os.path.join(run_dir, "model-q8_0.gguf")
    subprocess.run([args.ferrolm, "export", run_dir, "--type", "q8_0", "-o", gguf], check=True,
                   capture_output=True)
    ours = subprocess.run([args.ferrolm, "generate", "--model", gguf, "--raw", "--prompt", "ROMEO:",
                           "--max-tokens", "40", "--temperature", "0"], check=True,
                          capture_output=True, text=True).stdout
    print(f"ferrolm   (q8_0 GGUF, greedy): {ours!r}")
    if not os.path.exists(exe):
        print(f"llama-server not found at {exe}: set LLAMA_SERVER to check the GGUF in llama.cpp")
        return
    srv = subprocess.Popen([exe, "-m", gguf, "--host", "127.0.0.1", "--port", "18298", "-t", "1",
                            "-c", "64"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen("http://127.0.0.1:18298/health", timeout=1)
                break
            except Exception:
                time.sleep(0.1)
        body = json.dumps({"prompt": "ROMEO:", "n_predict": 40, "temperature": 0}).encode()
        req = urllib.request.Request("http://127.0.0.1:18298/completion", body,
                                     {"Content-Type": "application/json"})
        d = json.load(urllib.request.urlopen(req, timeout=30))
        print(f"llama.cpp (same GGUF, greedy):  {d['content']!r}")
    finally:
        srv.terminate()
        srv.wait()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--tokenizer", default="char")
    p.add_argument("--data", default=str(Path(__file__).resolve().parent.parent / "data" / "tinyshakespeare.txt"))
    p.add_argument("--ferrolm", default="target/release/ferrolm")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--with-llama", action="store_true", help="also time --arch llama in PyTorch")
    p.add_argument("--skip-torch", action="store_true")
    args = p.parse_args()

    rows = {"ferrolm": [], "torch-gpt": [], "torch-llama": []}
    last_run = None
    for r in range(args.rounds):
        tmp = tempfile.mkdtemp(prefix="ferrolm-train-bench-")
        last_run = os.path.join(tmp, "run")
        la = loadavg()
        f = ferrolm_run(args, last_run)
        rows["ferrolm"].append(f)
        print(f"round {r + 1}: ferrolm     {f['ms_median']:.1f} ms/iter (mean {f['ms_per_iter']:.1f}), "
              f"val {f['val_loss']:.4f}, {f['params']} params  [load {la}]", flush=True)
        if args.skip_torch:
            continue
        archs = ["gpt", "llama"] if args.with_llama else ["gpt"]
        for arch in archs:
            la = loadavg()
            t = torch_run(args, arch)
            rows[f"torch-{arch}"].append(t)
            print(f"round {r + 1}: torch-{arch:<5} {t['ms_per_iter']:.1f} ms/iter (mean "
                  f"{t['ms_per_iter_mean']:.1f}), val {t['val_loss']:.4f}, {t['params']} params  "
                  f"[load {la}]", flush=True)

    def med(name, key):
        v = [x[key] for x in rows[name]]
        return statistics.median(v) if v else float("nan")

    print(f"\nmedians over {args.rounds} rounds, {args.threads} threads, {args.iters} iterations:")
    fm = med("ferrolm", "ms_median")
    print(f"  ferrolm      {fm:7.1f} ms/iter  val loss {med('ferrolm', 'val_loss'):.4f}")
    for name in ("torch-gpt", "torch-llama"):
        if rows[name]:
            tm = med(name, "ms_per_iter")
            print(f"  {name:<12} {tm:7.1f} ms/iter  val loss {med(name, 'val_loss'):.4f}   "
                  f"ferrolm/{name} = {fm / tm:.2f}x")
    if last_run:
        llama_cpp_check(args, last_run)


if __name__ == "__main__":
    main()
