#!/usr/bin/env python3
"""Preference tuning you can check: DPO teaches SmolLM2-135M-Instruct a rule about its answers.

The seed's RLHF loop with a rule in the place of the human:
  1. generate several answers per prompt (the model itself, `ferrolm serve`, n samples at
     temperature 1);
  2. rank them by a rule a script can verify: *answer concisely* — a finished answer of at most
     --max-words words beats any other, and otherwise the shorter answer wins; the pair is
     (best, worst), kept when they differ by at least --min-gap words;
  3. `ferrolm finetune --method dpo` on the pairs (LoRA; the reference is the base with the
     adapter off);
  4. measure on held-out prompts (topics never trained on): the implicit reward's pair accuracy
     (from the run's evaluations), rule compliance of greedy answers before and after, and
     perplexity on a held-out text (the guard: it may rise by at most 5%);
  5. with --reward: a reward model (`ferrolm finetune --method reward`) on the same pairs, its
     held-out pair accuracy (`ferrolm eval reward`), and best-of-n with it on the held-out
     prompts (`best_of` on chat completions, the base served with `--lora rm=RUN`) against the
     base's greedy answers.

    python3 scripts/dpo_demo.py --ferrolm target/release/ferrolm --out /tmp/dpo-demo

Prints a table and writes DIR/summary.json. The figures in BENCHMARKS.md come from this script.
"""
import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

# Requests in flight at once: the server batches them (continuous batching).
CONCURRENCY = 8
# Words by which the preferred answer must be shorter, when both or neither comply.
MIN_GAP = 10

# Topics: the held-out prompts use the last quarter, never seen in training.
TOPICS = [
    "volcanoes", "the moon", "bees", "rainbows", "glaciers", "the internet", "vaccines", "tides",
    "photosynthesis", "earthquakes", "comets", "coral reefs", "electricity", "magnets", "clouds",
    "deserts", "penguins", "bread", "coffee", "chess", "the piano", "bicycles", "airplanes",
    "submarines", "batteries", "solar panels", "recycling", "the heart", "sleep", "dreams",
    "mushrooms", "whales", "owls", "tea", "maps", "compasses", "clocks", "calendars", "money",
    "banks", "libraries", "museums", "the olympics", "football", "jazz", "poetry", "painting",
    "sculpture", "bridges", "tunnels", "trains", "rockets", "satellites", "telescopes",
    "microscopes", "dinosaurs", "fossils", "rivers", "lakes", "forests", "wolves", "elephants",
    "octopuses", "ants", "spiders", "butterflies", "snow", "lightning", "wind", "hurricanes",
    "salt", "sugar", "chocolate", "cheese", "rice", "pasta", "soap", "paper", "glass", "steel",
]
TEMPLATES = [
    "What are {t}?", "Tell me about {t}.", "Explain {t} to a child.", "Why are {t} important?",
    "Give me a fact about {t}.", "How would you describe {t}?", "What should I know about {t}?",
    "Write something about {t}.",
]
SYSTEM = None  # the model's own default system prompt


def prompts(topics, rng, n):
    out = []
    for _ in range(n):
        out.append(rng.choice(TEMPLATES).format(t=rng.choice(topics)))
    return out


def words(text):
    return len(text.split())


def complies(choice, max_words):
    """The rule: a finished answer of at most max_words words."""
    text = choice["message"]["content"] or ""
    return choice["finish_reason"] == "stop" and 0 < words(text) <= max_words


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Server:
    def __init__(self, ferrolm, model, threads, log, extra=()):
        self.port = free_port()
        cmd = [ferrolm, "serve", "--port", str(self.port), "--threads", str(threads), *extra]
        if model:
            cmd += ["--model", model]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                urllib.request.urlopen(self.url + "/v1/models", timeout=2)
                break
            except Exception:
                if self.proc.poll() is not None:
                    sys.exit(f"ferrolm serve exited ({self.proc.returncode}); see the log")
                time.sleep(0.5)
        else:
            sys.exit("ferrolm serve did not start in 300 s")
        with urllib.request.urlopen(self.url + "/v1/models", timeout=10) as r:
            self.model = json.loads(r.read())["data"][0]["id"]

    def chat(self, prompt, **kw):
        msgs = [{"role": "user", "content": prompt}]
        body = json.dumps({"model": self.model, "messages": msgs, **kw}).encode()
        req = urllib.request.Request(self.url + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())

    def close(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


def pairs_for(server, ps, n, max_tokens, max_words, seed):
    """One pair per prompt whose samples hold both a compliant and a non-compliant answer.
    The server seeds choice j of a request with seed + j, so each prompt's seeds are n apart:
    a prompt drawn twice gets other samples."""
    out, skipped = [], 0
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        replies = list(pool.map(
            lambda ip: server.chat(ip[1], n=n, temperature=1.0, top_p=0.95, max_tokens=max_tokens,
                                   seed=seed + n * ip[0]), enumerate(ps)))
    samples = []
    for p, r in zip(ps, replies):
        ch = r["choices"]
        samples.append({"prompt": p, "answers": [[c["message"]["content"], c["finish_reason"]] for c in ch]})
        # the rule's order: compliant first, then fewer words
        ranked = sorted(ch, key=lambda c: (not complies(c, max_words), words(c["message"]["content"] or "")))
        best, worst = ranked[0], ranked[-1]
        gap = words(worst["message"]["content"] or "") - words(best["message"]["content"] or "")
        better = complies(best, max_words) and not complies(worst, max_words)
        if gap < MIN_GAP and not better:
            skipped += 1
            continue
        out.append({
            "input": {"messages": [{"role": "user", "content": p}]},
            "preferred_output": [{"role": "assistant", "content": best["message"]["content"]}],
            "non_preferred_output": [{"role": "assistant", "content": worst["message"]["content"]}],
        })
    return out, skipped, samples


def compliance(server, ps, max_tokens, max_words, save=None):
    """Greedy answers' compliance and median length; the answers go to `save` (JSONL), to be
    read: a rule can be met by answers nobody wants."""
    ok, lens = 0, []
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        replies = list(pool.map(lambda p: server.chat(p, temperature=0, max_tokens=max_tokens), ps))
    if save:
        write_jsonl(save, [{"prompt": p, "answer": r["choices"][0]["message"]["content"]}
                           for p, r in zip(ps, replies)])
    for r in replies:
        c = r["choices"][0]
        ok += complies(c, max_words)
        lens.append(words(c["message"]["content"] or ""))
    lens.sort()
    return ok / len(ps), lens[len(lens) // 2]


def best_of_compliance(server, ps, n, reward_model, max_tokens, max_words, save=None):
    """Best-of-n with the reward model: n answers at temperature 1, the one it scores highest
    kept; that answer's compliance and median length."""
    ok, lens = 0, []
    with ThreadPoolExecutor(CONCURRENCY // 2) as pool:
        replies = list(pool.map(
            lambda ip: server.chat(ip[1], temperature=1.0, top_p=0.95, max_tokens=max_tokens,
                                   seed=7 + n * ip[0], best_of={"n": n, "reward_model": reward_model}),
            enumerate(ps)))
    if save:
        write_jsonl(save, [{"prompt": p, "answer": r["choices"][0]["message"]["content"],
                            "scores": r["best_of"]["scores"], "chosen": r["best_of"]["chosen"]}
                           for p, r in zip(ps, replies)])
    for r in replies:
        c = r["choices"][0]
        ok += complies(c, max_words)
        lens.append(words(c["message"]["content"] or ""))
    lens.sort()
    return ok / len(ps), lens[len(lens) // 2]


def reward_stage(a, log, held_p):
    """A reward model on the same pairs: its held-out pair accuracy, and best-of-n with it."""
    rm = os.path.join(a.out, "rm")
    if not os.path.exists(os.path.join(rm, "adapter", "adapter_config.json")):
        cmd = [a.ferrolm, "finetune", "--method", "reward", "--train",
               os.path.join(a.out, "train.jsonl"), "--val", os.path.join(a.out, "heldout.jsonl"),
               "--out", rm, "--threads", str(a.threads), "--json"] + a.reward_args.split()
        subprocess.run(cmd, check=True, stderr=log, stdout=log)
    out = subprocess.run([a.ferrolm, "eval", "reward", "--model", rm, "--data",
                          os.path.join(a.out, "heldout.jsonl"), "--json", "-t", str(a.threads)],
                         check=True, capture_output=True, text=True).stdout
    ev = json.loads(out.strip().splitlines()[-1])
    srv = Server(a.ferrolm, None, a.threads, log, ["--lora", f"rm={rm}"])
    bo, bo_median = best_of_compliance(srv, held_p, a.n, "rm", a.max_tokens, a.max_words,
                                       os.path.join(a.out, "answers_best_of.jsonl"))
    srv.close()
    return {"heldout_pair_accuracy": ev["pair_accuracy"], "heldout_mean_margin": ev["mean_margin"],
            "best_of_n": a.n, "best_of_compliance": bo, "best_of_median_words": bo_median,
            "reward_args": a.reward_args}


def perplexity(ferrolm, model, text_path):
    cmd = [ferrolm, "eval", "perplexity", "--file", text_path, "--json"]
    if model:
        cmd += ["--model", model]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["ppl"]


def guard(ferrolm, run, out):
    """The guard: perplexity of the base and of `run` on a held-out text (the last 12,000
    characters of the repo's tinyshakespeare, written to OUT/heldout.txt)."""
    text = os.path.join(out, "heldout.txt")
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "..", "data", "tinyshakespeare.txt")) as f:
        corpus = f.read()
    with open(text, "w") as f:
        f.write(corpus[-12000:])
    return perplexity(ferrolm, None, text), perplexity(ferrolm, run, text)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ferrolm", default="target/release/ferrolm")
    ap.add_argument("--out", required=True)
    ap.add_argument("--train-prompts", type=int, default=160)
    ap.add_argument("--heldout-prompts", type=int, default=48)
    ap.add_argument("--n", type=int, default=4, help="samples per prompt")
    ap.add_argument("--max-words", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--finetune-args", default="--epochs 2 --batch 4 --lr 2e-4 --beta 0.1 "
                    "--eval-every 10 --max-len 160",
                    help="extra arguments for `ferrolm finetune --method dpo`")
    ap.add_argument("--reward", action="store_true",
                    help="also train a reward model on the pairs and measure best-of-n with it")
    ap.add_argument("--reward-args", default="--epochs 2 --batch 4 --lr 5e-4 --eval-every 10 "
                    "--max-len 160 --targets q,v,o,down",
                    help="extra arguments for `ferrolm finetune --method reward`")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    log = open(os.path.join(a.out, "log.txt"), "a")
    rng = random.Random(a.seed)
    cut = len(TOPICS) * 3 // 4
    train_p = prompts(TOPICS[:cut], rng, a.train_prompts)
    held_p = prompts(TOPICS[cut:], rng, a.heldout_prompts)

    # 1–2. samples from the base model, ranked by the rule (kept: a rerun with the same --out
    # goes on from the first stage not done)
    before_path = os.path.join(a.out, "before.json")
    gen_s = 0.0
    if os.path.exists(before_path):
        b = json.load(open(before_path))
        train_pairs = [json.loads(l) for l in open(os.path.join(a.out, "train.jsonl"))]
        held_pairs = [json.loads(l) for l in open(os.path.join(a.out, "heldout.jsonl"))]
        before, before_median, gen_s = b["compliance"], b["median_words"], b["generate_s"]
        print(f"stage 1 done before: {len(train_pairs)} train, {len(held_pairs)} held-out pairs")
    else:
        t0 = time.time()
        base = Server(a.ferrolm, None, a.threads, log)
        train_pairs, skipped_t, s_t = pairs_for(base, train_p, a.n, a.max_tokens, a.max_words, a.seed)
        held_pairs, skipped_h, s_h = pairs_for(base, held_p, a.n, a.max_tokens, a.max_words, a.seed + 10**6)
        write_jsonl(os.path.join(a.out, "samples.jsonl"), s_t + s_h)
        before, before_median = compliance(base, held_p, a.max_tokens, a.max_words,
                                           os.path.join(a.out, "answers_before.jsonl"))
        base.close()
        gen_s = time.time() - t0
        write_jsonl(os.path.join(a.out, "train.jsonl"), train_pairs)
        write_jsonl(os.path.join(a.out, "heldout.jsonl"), held_pairs)
        json.dump({"compliance": before, "median_words": before_median, "generate_s": gen_s},
                  open(before_path, "w"))
        print(f"pairs: {len(train_pairs)} train ({skipped_t} prompts whose answers were too alike), "
              f"{len(held_pairs)} held-out ({skipped_h} without); {gen_s:.0f} s; held-out greedy "
              f"compliance {before:.3f}, median {before_median} words", flush=True)

    # 3. DPO
    run = os.path.join(a.out, "run")
    t0 = time.time()
    if not os.path.exists(os.path.join(run, "adapter", "adapter_config.json")):
        cmd = [a.ferrolm, "finetune", "--method", "dpo", "--train",
               os.path.join(a.out, "train.jsonl"), "--val", os.path.join(a.out, "heldout.jsonl"),
               "--out", run, "--threads", str(a.threads), "--json"] + a.finetune_args.split()
        subprocess.run(cmd, check=True, stderr=log, stdout=log)
    train_s = sum(json.loads(l).get("ms", 0) for l in open(os.path.join(run, "metrics.jsonl"))) / 1e3
    evals = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl")) if '"val_loss"' in l]
    acc0, acc1 = evals[0]["pair_accuracy"], evals[-1]["pair_accuracy"]

    # 4. held-out behaviour and the guard
    tuned = Server(a.ferrolm, run, a.threads, log)
    after, after_median = compliance(tuned, held_p, a.max_tokens, a.max_words,
                                     os.path.join(a.out, "answers_after.jsonl"))
    tuned.close()
    ppl0, ppl1 = guard(a.ferrolm, run, a.out)

    summary = {
        "train_pairs": len(train_pairs), "heldout_pairs": len(held_pairs),
        "heldout_pair_accuracy": [acc0, acc1],
        "heldout_compliance": [before, after],
        "heldout_median_words": [before_median, after_median],
        "ppl": [ppl0, ppl1], "ppl_change": ppl1 / ppl0 - 1,
        "generate_s": gen_s, "train_steps_s": train_s, "finetune_args": a.finetune_args,
        "rule": f"finished and at most {a.max_words} words",
    }
    if a.reward:
        summary["reward_model"] = reward_stage(a, log, held_p)
    json.dump(summary, open(os.path.join(a.out, "summary.json"), "w"), indent=1)
    print(f"{'':34} {'before':>8} {'after':>8}")
    print(f"{'held-out pair accuracy (implicit)':34} {acc0:8.3f} {acc1:8.3f}")
    print(f"{'held-out rule compliance (greedy)':34} {before:8.3f} {after:8.3f}")
    print(f"{'held-out median words (greedy)':34} {before_median:8d} {after_median:8d}")
    print(f"{'perplexity, held-out text':34} {ppl0:8.3f} {ppl1:8.3f}  ({100 * (ppl1 / ppl0 - 1):+.2f}%)")
    if a.reward:
        r = summary["reward_model"]
        print(f"{'reward model: held-out pair acc.':34} {'':>8} {r['heldout_pair_accuracy']:8.3f}")
        print(f"{'compliance, best-of-%d vs greedy' % a.n:34} {before:8.3f} {r['best_of_compliance']:8.3f}")
    print(f"training steps: {train_s:.0f} s; summary: {os.path.join(a.out, 'summary.json')}")


if __name__ == "__main__":
    main()
