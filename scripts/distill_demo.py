#!/usr/bin/env python3
"""Distillation end to end: a fine-tuned teacher, a student 5-10x smaller trained from scratch
with the teacher's tokenizer, sequence-level against token-level, speed, cost and break-even.

Stages (each skipped when its output exists, so a rerun resumes):
  1. task     scripts/sft_task.py: "extract name, age and city as JSON"; two held-out sets of
              60: `test` with first names, surnames and cities training never shows, and
              `test-seen` with new combinations of the ones it does (no line of train.jsonl)
  2. teacher  SmolLM2-135M-Instruct + LoRA on the task (BENCHMARKS "It teaches"), merged to
              teacher.gguf (q8_0)
  3. seq      ferrolm distill --mode sequence: the student learns the teacher's replies
  4. token    ferrolm distill --mode token: the student learns the teacher's top-8 distribution
              (runs in DIR/{sequence,token}-ITERS; the token run reuses the teacher's replies)
  5. eval     exact-match accuracy on both held-out sets (ferrolm eval chat, greedy)
  6. speed    ferrolm bench decode tok/s, teacher and student (both q8_0 GGUF)
  7. cost     each model served with a self-hosted price (its measured speed at --usd-per-hour);
              the ledger's cost of the held-out requests (x-ferrolm-cost-usd); measured.json
              for `ferrolm cost distill --measured OUT`

    python3 scripts/distill_demo.py --out DIR [--ferrolm target/release/ferrolm]
        [--iters 1200] [--train 2000] [--threads 2]
"""
import argparse
import json
import os
import socket
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))

STUDENT = """# The student: 6 layers of width 224 with SmolLM2's 49,152-token vocabulary (tied
# embeddings): 14.6M parameters, 9.2x fewer than the 135M teacher.
[model]
layers = 6
heads = 4
width = 224
ffn = 608
context = 256
"""


def sh(cmd, **kw):
    print("+", " ".join(str(c) for c in cmd), flush=True)
    t = time.time()
    r = subprocess.run([str(c) for c in cmd], check=True, **kw)
    print(f"  ({time.time() - t:.0f} s)", flush=True)
    return r


def out_json(cmd):
    r = sh(cmd, stdout=subprocess.PIPE, text=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def served_cost(ferrolm, model, name, prices, test, threads, tmp):
    """Serve `model` priced by `prices`; send every held-out prompt; the ledger's cost each."""
    port = free_port()
    data = os.path.join(tmp, f"serve-{name}")
    os.makedirs(data, exist_ok=True)
    p = subprocess.Popen([ferrolm, "serve", "--model", model, "--port", str(port), "--data-dir", data,
                          "--prices", prices, "--threads", str(threads)],
                         stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, f"serve-{name}.log"), "w"))
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(base + "/health", timeout=1)
                break
            except Exception:
                time.sleep(0.2)
        mid = json.load(urllib.request.urlopen(base + "/v1/models"))["data"][0]["id"]
        costs, prompt_toks, completion_toks = [], [], []
        fields = {"json": 0, "name": 0, "age": 0, "city": 0}
        for line in open(test):
            msgs = json.loads(line)["messages"]
            want = json.loads(msgs[-1]["content"])
            msgs = msgs[:-1]
            body = json.dumps({"model": mid, "messages": msgs, "temperature": 0, "max_tokens": 64}).encode()
            req = urllib.request.Request(base + "/v1/chat/completions", body, {"content-type": "application/json"})
            with urllib.request.urlopen(req) as r:
                costs.append(float(r.headers["x-ferrolm-cost-usd"]))
                reply = json.load(r)
                u = reply["usage"]
            try:
                got = json.loads(reply["choices"][0]["message"]["content"])
                fields["json"] += 1
                for k in ["name", "age", "city"]:
                    fields[k] += int(isinstance(got, dict) and got.get(k) == want[k])
            except ValueError:
                pass
            prompt_toks.append(u["prompt_tokens"])
            completion_toks.append(u["completion_tokens"])
        return {"usd_per_request": statistics.mean(costs), "prompt_tokens": statistics.mean(prompt_toks),
                "completion_tokens": statistics.mean(completion_toks), "requests": len(costs),
                "field_accuracy": {k: v / len(costs) for k, v in fields.items()}}
    finally:
        p.terminate()
        p.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ferrolm", default=os.path.join(HERE, "..", "target", "release", "ferrolm"))
    ap.add_argument("--train", type=int, default=2000, help="training prompts")
    ap.add_argument("--iters", type=int, default=1200, help="student steps (each mode)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--usd-per-hour", type=float, default=0.10, help="the machine's price (as prices.toml)")
    ap.add_argument("--requests", type=int, default=1_000_000, help="requests a month for the break-even")
    a = ap.parse_args()
    F = os.path.abspath(a.ferrolm)
    D = os.path.abspath(a.out)
    os.makedirs(D, exist_ok=True)
    task = os.path.join(D, "task")
    t = str(a.threads)
    timings = json.load(open(os.path.join(D, "timings.json"))) if os.path.exists(os.path.join(D, "timings.json")) else {}

    def timed(key, fn):
        if key not in timings:
            t0 = time.time()
            fn()
            timings[key] = time.time() - t0
            json.dump(timings, open(os.path.join(D, "timings.json"), "w"), indent=1)

    # 1. the task
    if not os.path.exists(os.path.join(task, "test.jsonl")):
        sh([sys.executable, os.path.join(HERE, "sft_task.py"), "--out", task, "--train", a.train, "--val", 40, "--test", 60])
    seen = os.path.join(task, "test-seen.jsonl")
    if not os.path.exists(seen):
        sys.path.insert(0, HERE)
        import random
        import sft_task
        cut = lambda xs: xs[: len(xs) * 2 // 3]
        train_lines = set(open(os.path.join(task, "train.jsonl")).read().splitlines())
        rng, lines = random.Random(99), []
        while len(lines) < 60:
            line = json.dumps(sft_task.example(rng, cut(sft_task.FIRST), cut(sft_task.LAST), cut(sft_task.CITY)))
            if line not in train_lines and line not in lines:
                lines.append(line)
        open(seen, "w").write("\n".join(lines) + "\n")
    # 2. the teacher: the default model fine-tuned on the task, merged
    teacher = os.path.join(D, "teacher.gguf")
    if not os.path.exists(teacher):
        run = os.path.join(D, "teacher-run")
        timed("teacher_finetune_s", lambda: sh([F, "finetune", "--train", os.path.join(task, "train.jsonl"), "--out", run,
                                                "--iters", 100, "--lr", 5e-4, "--targets", "q,k,v,o,gate,up,down",
                                                "--batch", 4, "-t", t] + (["--resume"] if os.path.exists(os.path.join(run, "finetune.json")) else [])))
        base = json.load(open(os.path.join(run, "finetune.json")))["base"]
        sh([F, "merge", base, os.path.join(run, "adapter"), "--type", "q8_0", "-o", teacher])
    student_cfg = os.path.join(D, "student.toml")
    open(student_cfg, "w").write(STUDENT)
    # 3-4. the students
    first = None
    for mode in ["sequence", "token"]:
        run = os.path.join(D, f"{mode}-{a.iters}")
        done = [d for d in os.listdir(D) if os.path.exists(os.path.join(D, d, "teacher-val.jsonl"))]
        if not os.path.exists(run) and done:
            # The same teacher, prompts and sampling: a later run starts from the replies (and
            # top-k log-probs) an earlier one generated.
            os.makedirs(run)
            for f in ["distill.json", "teacher.jsonl", "teacher-val.jsonl"]:
                shutil.copy(os.path.join(D, done[0], f), os.path.join(run, f))
        # token-level learns the teacher's top-8 log-probs: its full softmax would cost a
        # 135M forward per step, several times the student's own step on this machine
        extra = ["--soft-targets", "top-k"] if mode == "token" else []
        timed(f"{mode}_{a.iters}_distill_s", lambda: sh([F, "distill", "--teacher", teacher, "--student", student_cfg,
                                               "--prompts", os.path.join(task, "train.jsonl"),
                                               "--val-prompts", os.path.join(task, "val.jsonl"),
                                               "--out", run, "--mode", mode, "--max-tokens", 64,
                                               "--iters", a.iters, "--batch", a.batch, "--lr", a.lr,
                                               "--eval-every", 50, "-t", t] + extra))
        gguf = os.path.join(D, f"student-{mode}-{a.iters}.gguf")
        if not os.path.exists(gguf):
            sh([F, "export", run, "--type", "q8_0", "-o", gguf])
    # 5. accuracy on the held-out set
    results = os.path.join(D, f"results-{a.iters}.json")
    res = json.load(open(results)) if os.path.exists(results) else {}

    def save():
        json.dump(res, open(results, "w"), indent=1)

    models = {"teacher": teacher}
    for mode in ["sequence", "token"]:
        models[f"student-{mode}"] = os.path.join(D, f"student-{mode}-{a.iters}.gguf")
    test = os.path.join(task, "test.jsonl")
    for name, m in models.items():
        for key, data in [(f"{name}_accuracy", test), (f"{name}_accuracy_seen", seen)]:
            if key not in res:
                r = out_json([F, "eval", "chat", "--data", data, "--model", m, "--max-tokens", 64, "--json", "-t", t])
                res[key] = r["accuracy"]
                save()
    # 6. decode speed, interleaved rounds
    if "speed" not in res:
        speed = {n: [] for n in models}
        for _ in range(3):
            for n, m in models.items():
                r = out_json([F, "bench", "--model", m, "--threads", t, "--json"])
                speed[n].append(r["decode_tps"])
        res["speed"] = {n: statistics.median(v) for n, v in speed.items()}
        res["speed_rounds"] = speed
        save()
    # 7. cost from the ledger, each model priced at its own measured speed
    if "cost" not in res:
        prices = os.path.join(D, "prices.toml")
        with open(prices, "w") as f:
            for n, m in models.items():
                mid = os.path.splitext(os.path.basename(m))[0]
                b = out_json([F, "bench", "--model", m, "--threads", t, "--json"])
                f.write(f'[[model]]\nid = "{mid}"\nprovider = "self-hosted"\n'
                        f'source = "scripts/distill_demo.py: ferrolm bench"\nas_of = "{time.strftime("%Y-%m-%d")}"\n'
                        f'[model.self_hosted]\nhardware = "2 vCPU cloud VM"\nhardware_usd_per_hour = {a.usd_per_hour}\n'
                        f'prefill_tokens_per_s = {b["prefill_tps_512"] or b["prefill_tps_128"]:.1f}\ndecode_tokens_per_s = {b["decode_tps"]:.1f}\n\n')
        res["cost"] = {n: served_cost(F, m, n, prices, test, a.threads, D) for n, m in models.items()}
        save()
    one_time_s = timings["teacher_finetune_s"] + sum(v for k, v in timings.items() if f"_{a.iters}_" in k)
    best = max(["sequence", "token"], key=lambda m: res[f"student-{m}_accuracy"])
    measured = {
        "teacher_usd_per_request": res["cost"]["teacher"]["usd_per_request"],
        "student_usd_per_request": res["cost"][f"student-{best}"]["usd_per_request"],
        "requests_per_month": a.requests,
        "input_tokens": round(res["cost"]["teacher"]["prompt_tokens"]),
        "output_tokens": round(res["cost"]["teacher"]["completion_tokens"]),
        "one_time_usd": one_time_s / 3600 * a.usd_per_hour,
        "notes": [f"{a.iters} student steps; teacher and student-{best} (the better student) served by ferrolm at their measured speeds, "
                  f"${a.usd_per_hour}/hour; costs from the ledger over {res['cost']['teacher']['requests']} held-out requests",
                  f"one-time: {one_time_s / 60:.1f} min of this machine (teacher fine-tune, teacher generation, "
                  f"both students' training)"],
    }
    json.dump(measured, open(os.path.join(D, "measured.json"), "w"), indent=1)
    json.dump(measured, open(os.path.join(D, f"measured-{a.iters}.json"), "w"), indent=1)
    ta = res["teacher_accuracy"]
    print(json.dumps({"results": res, "timings_s": timings}, indent=1))
    print()
    ts = res["teacher_accuracy_seen"]
    print("| model | exact match, unseen names | share of teacher | exact match, seen names | share of teacher | "
          "valid JSON | name | age | city | decode tok/s | $/request (ledger) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n in models:
        acc, accs = res[f"{n}_accuracy"], res[f"{n}_accuracy_seen"]
        f = res["cost"][n]["field_accuracy"]
        print(f"| {n} | {acc:.3f} | {acc / ta if ta else float('nan'):.2f} | {accs:.3f} | {accs / ts if ts else float('nan'):.2f} | "
              f"{f['json']:.2f} | {f['name']:.2f} | {f['age']:.2f} | {f['city']:.2f} | {res['speed'][n]:.1f} | "
              f"{res['cost'][n]['usd_per_request']:.3g} |")
    sh([F, "cost", "distill", "--measured", D])


if __name__ == "__main__":
    main()
