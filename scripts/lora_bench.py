#!/usr/bin/env python3
"""LoRA fine-tuning step time and memory: `ferrolm finetune` against Hugging Face PEFT on
PyTorch, side by side on the same machine and threads.

The target (SmolLM2-135M in f32): LoRA r=8 (alpha 16) on q and v, batch 4 x 256 tokens of
tinyshakespeare, step time ferrolm <= 1.0x PEFT; peak memory of LoRA (and QLoRA) against full
fine-tuning.

Each round runs, one after the other, each in its own process under `/usr/bin/time -v`:
  1. ferrolm lora   `ferrolm finetune --weights lora --rank 8 --alpha 16 --targets q,v
                     --max-len 256 --batch 4 --iters N --threads T` on a chat JSONL whose lines are
                     {"messages": [{"role": "system", "content": ""},
                     {"role": "assistant", "content": CHUNK}]}, CHUNKs of tinyshakespeare
                     (starting at a speech) long enough (--chunk-chars) that every sequence is
                     cut at 256 tokens: each step is 4 x 256 positions, of which the ~7 of the
                     template's empty system turn and assistant header are run but not scored.
                     (The empty system message is there because this ferrolm rejects
                     assistant-only conversations under SmolLM2's template, which then inserts
                     its default system prompt; --no-system leaves it out);
  2. torch lora     this script's worker: the base GGUF loaded by transformers (dequantized to
                     f32), PEFT LoraConfig(r=8, lora_alpha=16, q_proj/v_proj, dropout 0), AdamW
                     lr 2e-4 (weight decay 0, as ferrolm), grad-norm clip 1.0 (as ferrolm),
                     batches of 4 random 257-token windows of the tokenized text (256 inputs,
                     256 targets, all scored), torch.set_num_threads(T);
  3. ferrolm qlora  (only with --qlora, and only if the binary has `finetune --qlora`): as 1
                     with the base kept quantized;
  4. ferrolm full   `--weights full` (all weights trainable);
  5. torch full     the worker with every parameter trainable, AdamW lr 1e-5.
Step time: the median over steps --warmup.. of each step's wall time (ferrolm: "ms" in
OUT/metrics.jsonl; the worker: its own clock around zero_grad+forward+backward+clip+step).
Memory: "peak RSS" is /usr/bin/time's Maximum resident set size of the whole run (loading the
model included; the worker also reports its own getrusage ru_maxrss, which matches); "steps
RSS" is the largest VmRSS this script sampled (every 50 ms) while steps 1..N-1 were running,
i.e. the steady-state training footprint without model loading or the final checkpoint save.
The load average is printed before each run: on a shared machine the numbers are noisy, so use
several --rounds and compare medians.

    nice -n 10 /work/torch-venv/bin/python scripts/lora_bench.py --steps 10 --rounds 3 --threads 2 \\
        [--base ~/.cache/ferrolm/models/SmolLM2-135M-Instruct.Q4_1.gguf] \\
        [--ferrolm target/release/ferrolm] [--python /work/torch-venv/bin/python] [--no-full] [--qlora]

Needs torch, transformers, peft, gguf in --python (default: the interpreter running this), and
GNU time at /usr/bin/time (`apt-get install -y time`).
"""
import argparse
import glob
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_base():
    home = os.environ.get("FERROLM_HOME") or os.path.expanduser("~/.cache/ferrolm")
    for d in (home, "/tmp/fhome"):
        found = sorted(glob.glob(os.path.join(d, "models", "*.gguf")))
        if found:
            return found[0]
    return None


# ---- PyTorch worker ----------------------------------------------------------------------------

def worker(args):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import resource
    import warnings
    warnings.filterwarnings("ignore")
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    torch.manual_seed(args.seed)
    d, name = os.path.split(os.path.abspath(args.base))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    try:
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    except TypeError:  # transformers < 4.56
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, torch_dtype=torch.float32)
    model.config.use_cache = False
    with open(args.data) as f:
        text = f.read()
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if args.worker == "lora":
        from peft import LoraConfig, get_peft_model
        cfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=["q_proj", "v_proj"],
                         lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, cfg)
        lr = 2e-4
    else:
        for p in model.parameters():
            p.requires_grad_(True)
        lr = 1e-5
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    t = args.seq
    with open(args.metrics, "w") as mf:
        for step in range(args.steps):
            starts = torch.randint(0, ids.numel() - t - 1, (args.batch,), generator=gen)
            win = torch.stack([ids[s:s + t + 1] for s in starts.tolist()])
            x, y = win[:, :-1].contiguous(), win[:, 1:].contiguous()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            logits = model(input_ids=x).logits
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            ms = (time.perf_counter() - t0) * 1e3
            del logits
            mf.write(json.dumps({"step": step, "loss": loss.item(), "ms": ms,
                                 "trained_tokens": (step + 1) * x.numel()}) + "\n")
            mf.flush()
    maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"trainable": n_train, "tokens": int(ids.numel()), "maxrss_kib": maxrss_kib,
                      "torch": torch.__version__, "threads": torch.get_num_threads()}))


# ---- orchestration ----------------------------------------------------------------------------

def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def step_lines(path):
    try:
        with open(path) as f:
            return sum(1 for line in f if '"ms"' in line)
    except OSError:
        return 0


def run_timed(cmd, metrics, steps, env=None):
    """Run `cmd` under /usr/bin/time -v, sampling the child's RSS while steps 1..steps-1 run.
    Returns (stdout, stderr, max RSS KiB from time, steps RSS KiB)."""
    p = subprocess.Popen(["/usr/bin/time", "-v"] + cmd, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            n = step_lines(metrics)
            if 1 <= n < steps:
                peak[0] = max([peak[0]] + [rss_kib(c) for c in children(p.pid)])
            done.wait(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = p.communicate()
    done.set()
    th.join()
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}:\n{err[-3000:]}")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    return out, err, int(m.group(1)) if m else 0, peak[0]


def read_steps(path, warmup):
    ms, toks = [], []
    with open(path) as f:
        for line in f:
            v = json.loads(line)
            if "ms" in v:
                ms.append(v["ms"])
                toks.append(v.get("trained_tokens"))
    per_step = None
    if len(toks) >= 2 and None not in toks:
        per_step = toks[-1] - toks[-2]
    timed = ms[warmup:] if len(ms) > warmup else ms
    return statistics.median(timed), ms, per_step


def write_jsonl(args, path):
    with open(args.data) as f:
        text = f.read()
    n = max(64, 4 * args.batch * args.steps)
    rng = random.Random(args.seed)
    with open(path, "w") as f:
        for _ in range(n):
            # start at a speech (after a blank line) and strip: leading whitespace would merge
            # with the template's "assistant\n" into other tokens, which ferrolm rejects
            s = text.find("\n\n", rng.randrange(0, len(text) - 2 * args.chunk_chars)) + 2
            chunk = text[s:s + args.chunk_chars].strip()
            # an explicit empty system message: with an assistant-only conversation SmolLM2's
            # template inserts its default system prompt, and ferrolm (this version) rejects
            # that ("does not render this conversation incrementally (message 0 ...)")
            msgs = [{"role": "assistant", "content": chunk}]
            if args.system:
                msgs.insert(0, {"role": "system", "content": ""})
            f.write(json.dumps({"messages": msgs}) + "\n")


def ferrolm_run(args, method, jsonl, work):
    out = os.path.join(work, f"ferrolm_{method}")
    shutil.rmtree(out, ignore_errors=True)
    qlora = method == "qlora"
    cmd = [args.ferrolm, "finetune", "--model", args.base, "--train", jsonl, "--out", out,
           "--weights", "full" if method == "full" else "lora", "--rank", str(args.rank),
           "--alpha", str(args.alpha), "--targets", "q,v", "--max-len", str(args.seq),
           "--batch", str(args.batch), "--iters", str(args.steps), "--eval-every", "1000",
           "--threads", str(args.threads), "--json"] + (["--qlora"] if qlora else [])
    metrics = os.path.join(out, "metrics.jsonl")
    _, _, maxrss, steps_rss = run_timed(cmd, metrics, args.steps)
    med, ms, tok = read_steps(metrics, args.warmup)
    shutil.rmtree(out, ignore_errors=True)
    return {"ms": med, "all_ms": ms, "rss": maxrss, "steps_rss": steps_rss, "tokens": tok}


def torch_run(args, mode, work):
    metrics = os.path.join(work, f"torch_{mode}.jsonl")
    if os.path.exists(metrics):
        os.remove(metrics)
    cmd = [args.python, os.path.abspath(__file__), "--worker", mode, "--metrics", metrics,
           "--base", args.base, "--data", args.data, "--steps", str(args.steps),
           "--threads", str(args.threads), "--batch", str(args.batch), "--seq", str(args.seq),
           "--rank", str(args.rank), "--alpha", str(args.alpha), "--seed", str(args.seed)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               HF_HUB_OFFLINE="1")
    out, _, maxrss, steps_rss = run_timed(cmd, metrics, args.steps, env)
    info = json.loads(out.strip().splitlines()[-1])
    med, ms, tok = read_steps(metrics, args.warmup)
    return {"ms": med, "all_ms": ms, "rss": maxrss, "steps_rss": steps_rss, "tokens": tok,
            "self_maxrss": info["maxrss_kib"], "trainable": info["trainable"]}


def mib(kib):
    return f"{kib / 1024:8.0f}" if kib else "       -"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default=default_base())
    ap.add_argument("--ferrolm", default=os.path.join(REPO, "target", "release", "ferrolm"))
    ap.add_argument("--python", default=sys.executable, help="interpreter with torch+transformers+peft")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parent.parent / "data" / "tinyshakespeare.txt"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2, help="steps excluded from the median")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--chunk-chars", type=int, default=3000,
                    help="characters per JSONL example (must be > --seq tokens)")
    ap.add_argument("--no-system", dest="system", action="store_false",
                    help="assistant-only JSONL lines (no empty system message first)")
    ap.add_argument("--no-full", action="store_true", help="skip the full fine-tuning runs")
    ap.add_argument("--qlora", action="store_true", help="also run ferrolm --qlora (if supported)")
    ap.add_argument("--worker", choices=["lora", "full"], help=argparse.SUPPRESS)
    ap.add_argument("--metrics", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if not args.base or not os.path.exists(args.base):
        sys.exit("no base GGUF: pass --base (or run `ferrolm pull`)")
    if not os.path.exists("/usr/bin/time"):
        sys.exit("GNU time is missing: apt-get install -y time")
    if args.steps <= args.warmup:
        sys.exit("--steps must be > --warmup")

    runs = [("ferrolm", "lora"), ("torch", "lora")]
    if args.qlora:
        h = subprocess.run([args.ferrolm, "finetune", "--help"], capture_output=True, text=True)
        if "--qlora" in h.stdout:
            runs.append(("ferrolm", "qlora"))
        else:
            print("note: this ferrolm binary has no `finetune --qlora`; skipping QLoRA")
    if not args.no_full:
        runs += [("ferrolm", "full"), ("torch", "full")]

    work = tempfile.mkdtemp(prefix="lora_bench_")
    jsonl = os.path.join(work, "train.jsonl")
    write_jsonl(args, jsonl)
    print(f"base {args.base}; batch {args.batch} x {args.seq}, r={args.rank} alpha={args.alpha:g} "
          f"on q,v; {args.steps} steps (median of steps {args.warmup}..), {args.threads} threads, "
          f"{args.rounds} round(s)")
    results = {r: [] for r in runs}
    try:
        for rnd in range(args.rounds):
            for side, mode in runs:
                la = os.getloadavg()
                t0 = time.time()
                res = (ferrolm_run(args, mode, jsonl, work) if side == "ferrolm"
                       else torch_run(args, mode, work))
                res["load"] = la
                results[(side, mode)].append(res)
                print(f"round {rnd + 1} {side:7} {mode:5}  load {la[0]:5.2f} {la[1]:5.2f}  "
                      f"{res['ms']:8.1f} ms/step  peak RSS {res['rss'] / 1024:6.0f} MiB  "
                      f"steps RSS {res['steps_rss'] / 1024:6.0f} MiB  scored tok/step "
                      f"{res['tokens']}  ({time.time() - t0:.0f} s; steps ms "
                      f"{' '.join(f'{x:.0f}' for x in res['all_ms'])})", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{'runtime':8} {'method':6} {'ms/step':>9} {'peak RSS':>9} {'steps RSS':>9}  "
          f"(median over {args.rounds} round(s); RSS in MiB)")
    med = {}
    for (side, mode), rs in results.items():
        med[(side, mode)] = statistics.median(r["ms"] for r in rs)
        rss = max(r["rss"] for r in rs)
        srss = max(r["steps_rss"] for r in rs)
        print(f"{side:8} {mode:6} {med[(side, mode)]:9.1f} {mib(rss):>9} {mib(srss):>9}")
    ratio = med[("ferrolm", "lora")] / med[("torch", "lora")]
    print(f"\nLoRA step time ferrolm / PEFT: {ratio:.2f}x (target <= 1.0x)")
    if ("ferrolm", "full") in med:
        print(f"full step time ferrolm / PyTorch: "
              f"{med[('ferrolm', 'full')] / med[('torch', 'full')]:.2f}x")
        for side in ("ferrolm", "torch"):
            lo = max(r["rss"] for r in results[(side, "lora")])
            fu = max(r["rss"] for r in results[(side, "full")])
            print(f"{side}: peak RSS LoRA / full = {lo / fu:.2f}")
        if ("ferrolm", "qlora") in results:
            q = max(r["rss"] for r in results[("ferrolm", "qlora")])
            fu = max(r["rss"] for r in results[("ferrolm", "full")])
            print(f"ferrolm: peak RSS QLoRA / full = {q / fu:.2f}")


if __name__ == "__main__":
    main()
