#!/usr/bin/env python3
"""Eager against lazy tool loading on the 40-tool request set (data/lazy_tools/requests.json).

Standard library only. Loopback servers only. Against a running `ferrolm serve` (any
--tool-strategy: every request names its own), it sends each of the 40 requests with all 40
tools, at temperature 0, four ways: tool_strategy eager and lazy (threshold 8 tools), each with
tool_choice "auto" (the model decides whether to call) and "required" (a call is forced: eager,
one of the 40 by grammar; lazy, load_tools by grammar, then one of the 40). It prints, per way:

  first prompt   mean prompt tokens of the request as first sent (lazy: from x-ferrolm-tools)
  eager prompt   the same request with every definition (lazy: from x-ferrolm-tools)
  prompt run     mean prompt tokens the request ran, every pass (usage.prompt_tokens)
  cached         mean cached prompt tokens (usage.prompt_tokens_details.cached_tokens)
  completion     mean completion tokens (load_tools calls included)
  loads          requests in which a load_tools round ran (prompt run > first prompt)
  called         requests answered with a tool call
  correct        requests whose first call is the expected tool (tool-selection accuracy)
  seconds        wall time of the 40 requests

    python3 scripts/lazy_tools.py --url http://127.0.0.1:8080 [--json FILE]
"""

import argparse
import ipaddress
import json
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def loopback_only(url):
    host = urllib.parse.urlparse(url).hostname or ""
    addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    if not addrs or not all(ipaddress.ip_address(a).is_loopback for a in addrs):
        sys.exit(f"{url}: not a loopback address; this script only talks to local servers")


def post(url, body):
    req = urllib.request.Request(
        url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.status, r.headers.get("x-ferrolm-tools"), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, None, json.loads(e.read() or b"{}")


def header_counts(h):
    """`lazy; tools=N; prompt_tokens=E->L` -> (E, L)."""
    for part in h.split("; "):
        if part.startswith("prompt_tokens="):
            e, l = part[len("prompt_tokens="):].split("->")
            return int(e), int(l)
    raise ValueError(f"no prompt_tokens in x-ferrolm-tools: {h}")


def run(url, tools, requests, strategy, choice, max_tokens):
    rows = []
    t0 = time.time()
    for r in requests:
        body = {
            "messages": [{"role": "user", "content": r["content"]}],
            "tools": tools,
            "tool_choice": choice,
            "tool_strategy": strategy,
            "lazy_tools_threshold": 8,
            "temperature": 0,
            "max_tokens": max_tokens,
        }
        status, header, v = post(url, body)
        if status != 200:
            sys.exit(f"{strategy}/{choice}: HTTP {status}: {v}")
        u = v["usage"]
        if strategy == "lazy":
            if header is None:
                sys.exit("a lazy request came back without x-ferrolm-tools: is the threshold passed?")
            eager, first = header_counts(header)
        else:
            eager = first = u["prompt_tokens"]
        calls = v["choices"][0]["message"].get("tool_calls") or []
        name = calls[0]["function"]["name"] if calls else None
        rows.append({
            "expect": r["expect"],
            "called": name,
            "first_prompt": first,
            "eager_prompt": eager,
            "prompt_run": u["prompt_tokens"],
            "cached": u["prompt_tokens_details"]["cached_tokens"],
            "completion": u["completion_tokens"],
        })
    return rows, time.time() - t0


def summary(rows, seconds):
    n = len(rows)
    mean = lambda k: sum(r[k] for r in rows) / n
    return {
        "requests": n,
        "first_prompt": mean("first_prompt"),
        "eager_prompt": mean("eager_prompt"),
        "prompt_run": mean("prompt_run"),
        "cached": mean("cached"),
        "completion": mean("completion"),
        "loads": sum(r["prompt_run"] > r["first_prompt"] for r in rows),
        "called": sum(r["called"] is not None for r in rows),
        "correct": sum(r["called"] == r["expect"] for r in rows),
        "seconds": seconds,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--data", default=str(ROOT / "data/lazy_tools/requests.json"))
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--json", help="write every request's figures here")
    a = ap.parse_args()
    loopback_only(a.url)
    data = json.loads(Path(a.data).read_text())
    tools, requests = data["tools"], data["requests"]
    assert len(tools) == 40, "the request set has 40 tools"
    out = {}
    print(f"{'way':<16} {'first prompt':>12} {'eager prompt':>12} {'prompt run':>10} {'cached':>8} "
          f"{'completion':>10} {'loads':>5} {'called':>6} {'correct':>7} {'seconds':>7}")
    for choice in ["auto", "required"]:
        for strategy in ["eager", "lazy"]:
            rows, secs = run(a.url, tools, requests, strategy, choice, a.max_tokens)
            s = summary(rows, secs)
            way = f"{strategy}/{choice}"
            out[way] = {"summary": s, "requests": rows}
            print(f"{way:<16} {s['first_prompt']:>12.0f} {s['eager_prompt']:>12.0f} {s['prompt_run']:>10.0f} "
                  f"{s['cached']:>8.0f} {s['completion']:>10.1f} {s['loads']:>5} "
                  f"{s['called']:>3}/{s['requests']:<2} {s['correct']:>4}/{s['requests']:<2} {secs:>7.1f}",
                  flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
