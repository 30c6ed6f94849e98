#!/usr/bin/env python3
"""A DPO step, ferrolm against TRL's DPOTrainer: same base, LoRA, pairs, batch and threads.

The target (issue 14): step time ferrolm <= 1.0x TRL, peak memory <= 0.6x.

The pairs: --pairs lines of OpenAI's preference format, each a short user turn ("Continue the
play.") and two assistant answers cut from tinyshakespeare (data/tinyshakespeare.txt) at
--answer-chars characters, so every sequence has about the same length and none is cut.

Each round runs, one after the other, each in its own process under `/usr/bin/time -v`:
  1. ferrolm   `ferrolm finetune --method dpo --weights lora --rank 8 --alpha 16 --targets q,v
                --batch B --iters N --threads T --beta 0.1 --lr 5e-5 --eval-every N` (its
                reference log-probs are computed once before step 0, with the adapter off, and
                cached: the steps carry no reference forward);
  2. trl       this script's worker: the base GGUF loaded by transformers (dequantized to f32),
                PEFT LoraConfig(r=8, lora_alpha=16, q_proj/v_proj, dropout 0), DPOTrainer with
                DPOConfig(per_device_train_batch_size=B, beta=0.1, learning_rate=5e-5,
                max_steps=N, use_cpu=True) — TRL's defaults otherwise, so the reference forward
                (the base with the adapter disabled) runs inside every step, as TRL users run it;
  3. trl-pre   the same with precompute_ref_log_probs=True (the reference computed before
                training, like ferrolm): the like-for-like step.
Step time: the median over steps --warmup.. of each step's wall time (ferrolm: "ms" in its
metrics.jsonl; TRL: a callback's clock from on_step_begin to on_step_end). Memory: /usr/bin/time's
maximum resident set size of the whole run. The load average is printed before each run: the
machine is shared, so use several --rounds and compare medians.

    nice -n 10 /work/torch-venv/bin/python scripts/dpo_bench.py --rounds 3 --threads 2 \\
        [--base ~/.cache/ferrolm/models/SmolLM2-135M-Instruct.Q4_1.gguf] [--ferrolm target/release/ferrolm]

Needs torch, transformers, peft, trl and gguf in the interpreter running it, and GNU time.
"""
import argparse
import glob
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_base():
    home = os.environ.get("FERROLM_HOME") or os.path.expanduser("~/.cache/ferrolm")
    found = sorted(glob.glob(os.path.join(home, "models", "*.gguf")))
    return found[0] if found else None


def write_pairs(args, path):
    with open(os.path.join(REPO, "data", "tinyshakespeare.txt")) as f:
        text = f.read()
    rng = random.Random(args.seed)
    n = args.answer_chars

    def chunk():
        s = rng.randrange(0, len(text) - n)
        return text[s:s + n]

    with open(path, "w") as f:
        for _ in range(args.pairs):
            f.write(json.dumps({
                "input": {"messages": [{"role": "user", "content": "Continue the play."}]},
                "preferred_output": [{"role": "assistant", "content": chunk()}],
                "non_preferred_output": [{"role": "assistant", "content": chunk()}],
            }) + "\n")


# ---- TRL worker -------------------------------------------------------------------------------

def worker(args):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import resource
    import warnings
    warnings.filterwarnings("ignore")
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    d, name = os.path.split(os.path.abspath(args.base))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    # The GGUF is dequantized to f32 on load, but transformers still marks the model as
    # GGUF-quantized, and Trainer refuses to train a quantized model: drop the marker.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    rows = []
    with open(args.data) as f:
        for line in f:
            v = json.loads(line)
            rows.append({"prompt": v["input"]["messages"],
                         "chosen": v["preferred_output"], "rejected": v["non_preferred_output"]})
    ds = Dataset.from_list(rows)
    peft = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                      bias="none", task_type="CAUSAL_LM")
    out = tempfile.mkdtemp()
    cfg = DPOConfig(output_dir=out, per_device_train_batch_size=args.batch, beta=0.1,
                    learning_rate=5e-5, max_steps=args.steps, use_cpu=True, logging_steps=1,
                    save_strategy="no", report_to=[], dataloader_num_workers=0,
                    precompute_ref_log_probs=args.worker == "trl-pre", max_length=1024,
                    weight_decay=0.0, max_grad_norm=1.0, lr_scheduler_type="cosine", seed=args.seed)

    class Clock(TrainerCallback):
        def __init__(self):
            self.f = open(args.metrics, "w")

        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            ms = (time.perf_counter() - self.t0) * 1e3
            self.f.write(json.dumps({"step": state.global_step, "ms": ms}) + "\n")
            self.f.flush()

    trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok,
                         peft_config=peft, callbacks=[Clock()])
    trainer.train()
    print(json.dumps({"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "torch": torch.__version__, "threads": torch.get_num_threads()}))


# ---- orchestration ----------------------------------------------------------------------------

def run_timed(cmd, env=None):
    p = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stderr[-3000:]}")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    return p.stdout, p.stderr, int(m.group(1)) if m else 0


def median_ms(path, warmup):
    ms = [json.loads(l)["ms"] for l in open(path) if '"ms"' in l]
    timed = ms[warmup:] if len(ms) > warmup else ms
    return statistics.median(timed), ms


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=default_base())
    ap.add_argument("--ferrolm", default=os.path.join(REPO, "target/release/ferrolm"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4, help="pairs per step")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--answer-chars", type=int, default=500)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--only", default="ferrolm,trl,trl-pre")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--metrics", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if not args.base:
        sys.exit("no base model: pass --base (run `ferrolm pull` first)")
    work = tempfile.mkdtemp(prefix="dpo-bench-")
    data = os.path.join(work, "pairs.jsonl")
    write_pairs(args, data)
    results = {k: [] for k in args.only.split(",")}
    for r in range(args.rounds):
        for kind in results:
            load = os.getloadavg()[0]
            metrics = os.path.join(work, f"{kind}-{r}.jsonl")
            if kind == "ferrolm":
                run = os.path.join(work, f"run-{r}")
                cmd = [args.ferrolm, "finetune", "--method", "dpo", "--model", args.base,
                       "--train", data, "--out", run, "--weights", "lora", "--rank", "8",
                       "--alpha", "16", "--targets", "q,v", "--batch", str(args.batch),
                       "--iters", str(args.steps), "--threads", str(args.threads),
                       "--beta", "0.1", "--lr", "5e-5", "--eval-every", str(args.steps),
                       "--max-len", "1024"]
                _, _, rss = run_timed(cmd)
                med, ms = median_ms(os.path.join(run, "metrics.jsonl"), args.warmup)
            else:
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--base",
                       args.base, "--data", data, "--metrics", metrics, "--threads",
                       str(args.threads), "--batch", str(args.batch), "--steps", str(args.steps),
                       "--seed", str(args.seed)]
                _, _, rss = run_timed(cmd)
                med, ms = median_ms(metrics, args.warmup)
            results[kind].append({"ms": med, "rss_mib": rss / 1024, "load": load})
            print(f"round {r} {kind:8} {med:8.1f} ms/step  peak RSS {rss / 1024:6.0f} MiB  "
                  f"(load {load:.2f}; steps {[round(x) for x in ms]})", flush=True)
    print()
    print(f"{'':10} {'ms/step':>9} {'peak MiB':>9} {'time ×':>8} {'memory ×':>9}")
    base = results.get("ferrolm")
    fm = statistics.median(x["ms"] for x in base) if base else None
    fr = statistics.median(x["rss_mib"] for x in base) if base else None
    for kind, rs in results.items():
        ms = statistics.median(x["ms"] for x in rs)
        mb = statistics.median(x["rss_mib"] for x in rs)
        ratio = f"{fm / ms:8.2f} {fr / mb:9.2f}" if fm and kind != "ferrolm" else ""
        print(f"{kind:10} {ms:9.1f} {mb:9.0f} {ratio}")
    print("(× = ferrolm / this: below 1 means ferrolm takes less)")
    json.dump({"args": vars(args), "results": results},
              open(os.path.join(work, "results.json"), "w"), indent=1)
    print(f"results: {os.path.join(work, 'results.json')}")


if __name__ == "__main__":
    main()
