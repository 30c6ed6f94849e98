#!/usr/bin/env python3
"""RL you can check: GRPO against a reward model teaches SmolLM2-135M-Instruct the DPO demo's rule.

The seed's fourth RLHF stage, on the reward model that `scripts/dpo_demo.py --reward` trains
(pairs ranked by the rule *answer concisely*: a finished answer of at most --max-words words):

  1. held-out prompts (topics never trained on): greedy answers of the base, their rule
     compliance and median length;
  2. `ferrolm finetune --method rl --reward-model RM` on training-topic prompts: each step
     samples --samples answers per prompt through the inference engine with the current
     adapter, scores them with the reward model, and takes a GRPO step with a KL penalty to
     the base; the run evaluates the mean reward of greedy answers to the held-out prompts at
     step 0 and at every evaluation;
  3. held-out greedy answers of the tuned model: compliance and median length, and the
     perplexity guard on a held-out text (it may rise by at most 5%).

    python3 scripts/dpo_demo.py --reward --out /tmp/dpo-demo          # the reward model
    python3 scripts/rl_demo.py --reward-model /tmp/dpo-demo/rm --out /tmp/rl-demo

With --grader G.json instead of --reward-model, the same loop runs on an OpenAI grader (the
prompts file's lines then need the fields the grader reads). Prints a table and writes
DIR/summary.json. The figures in BENCHMARKS.md come from this script.
"""
import argparse
import json
import os
import random
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dpo_demo as d  # noqa: E402  (the same topics, prompts, rule, server and guard)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ferrolm", default="target/release/ferrolm")
    ap.add_argument("--out", required=True)
    score = ap.add_mutually_exclusive_group(required=True)
    score.add_argument("--reward-model", help="a `ferrolm finetune --method reward` run")
    score.add_argument("--grader", help="an OpenAI grader JSON file")
    ap.add_argument("--train-prompts", type=int, default=160)
    ap.add_argument("--heldout-prompts", type=int, default=48)
    ap.add_argument("--max-words", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--rl-args", default="--samples 4 --batch 4 --iters 30 --lr 3e-4 --beta 0.04 "
                    "--eval-every 10 --max-len 160 --targets q,v,o,down",
                    help="extra arguments for `ferrolm finetune --method rl`")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    log = open(os.path.join(a.out, "log.txt"), "a")
    rng = random.Random(a.seed)
    cut = len(d.TOPICS) * 3 // 4
    train_p = d.prompts(d.TOPICS[:cut], rng, a.train_prompts)
    held_p = d.prompts(d.TOPICS[cut:], rng, a.heldout_prompts)
    line = lambda p: {"messages": [{"role": "user", "content": p}]}  # noqa: E731
    d.write_jsonl(os.path.join(a.out, "prompts.jsonl"), [line(p) for p in train_p])
    d.write_jsonl(os.path.join(a.out, "heldout.jsonl"), [line(p) for p in held_p])

    # 1. the base's greedy answers
    base = d.Server(a.ferrolm, None, a.threads, log)
    before, before_median = d.compliance(base, held_p, a.max_tokens, a.max_words,
                                         os.path.join(a.out, "answers_before.jsonl"))
    base.close()
    print(f"held-out greedy compliance before: {before:.3f}, median {before_median} words", flush=True)

    # 2. RL
    run = os.path.join(a.out, "run")
    scorer = (["--reward-model", a.reward_model] if a.reward_model else ["--grader", a.grader])
    t0 = time.time()
    if not os.path.exists(os.path.join(run, "adapter", "adapter_config.json")):
        cmd = [a.ferrolm, "finetune", "--method", "rl", "--prompts",
               os.path.join(a.out, "prompts.jsonl"), "--val", os.path.join(a.out, "heldout.jsonl"),
               "--max-tokens", str(a.max_tokens), "--out", run, "--threads", str(a.threads),
               "--json", *scorer] + a.rl_args.split()
        subprocess.run(cmd, check=True, stderr=log, stdout=log)
    wall = time.time() - t0
    rows = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))]
    evals = [r for r in rows if "val_reward_mean" in r]
    steps = [r for r in rows if "reward_mean" in r]
    r0, r1 = evals[0]["val_reward_mean"], evals[-1]["val_reward_mean"]
    split = {k: sum(r[k] for r in steps) for k in ("sample_s", "score_s", "train_s")}

    # 3. the tuned model's greedy answers, and the guard
    tuned = d.Server(a.ferrolm, run, a.threads, log)
    after, after_median = d.compliance(tuned, held_p, a.max_tokens, a.max_words,
                                       os.path.join(a.out, "answers_after.jsonl"))
    tuned.close()
    ppl0, ppl1 = d.guard(a.ferrolm, run, a.out)

    summary = {
        "train_prompts": len(train_p), "heldout_prompts": len(held_p),
        "heldout_greedy_reward": [r0, r1],
        "heldout_greedy_reward_by_eval": [[e["step"], e["val_reward_mean"]] for e in evals],
        "step_reward_mean": [[s["step"], s["reward_mean"]] for s in steps],
        "heldout_compliance": [before, after],
        "heldout_median_words": [before_median, after_median],
        "ppl": [ppl0, ppl1], "ppl_change": ppl1 / ppl0 - 1,
        "steps": len(steps), "run_s": wall, "split_s": split,
        "rl_args": a.rl_args, "scorer": scorer,
        "rule": f"finished and at most {a.max_words} words",
    }
    json.dump(summary, open(os.path.join(a.out, "summary.json"), "w"), indent=1)
    print(f"{'':34} {'before':>8} {'after':>8}")
    print(f"{'held-out mean reward (greedy)':34} {r0:8.3f} {r1:8.3f}")
    print(f"{'held-out rule compliance (greedy)':34} {before:8.3f} {after:8.3f}")
    print(f"{'held-out median words (greedy)':34} {before_median:8d} {after_median:8d}")
    print(f"{'perplexity, held-out text':34} {ppl0:8.3f} {ppl1:8.3f}  ({100 * (ppl1 / ppl0 - 1):+.2f}%)")
    print(f"{len(steps)} steps in {wall:.0f} s (sampling {split['sample_s']:.0f} s, scoring "
          f"{split['score_s']:.0f} s, training {split['train_s']:.0f} s); "
          f"summary: {os.path.join(a.out, 'summary.json')}")


if __name__ == "__main__":
    main()
