#!/usr/bin/env python3
"""Soak test: mixed traffic against `ferrolm serve` at a fixed concurrency for N minutes.

Prints, every --report seconds, the requests done, errors by HTTP status and the server's
resident memory (VmRSS of its process); at the end a summary with the RSS growth per 1,000
requests. Standard library only.

    python3 scripts/soak.py --minutes 10                  # starts target/release/ferrolm serve
    python3 scripts/soak.py --base http://127.0.0.1:8080 --pid 1234 --minutes 10

The traffic mix, chosen at random per request (seeded): OpenAI chat (JSON and SSE), chat with a
JSON schema, chat with a forced tool call, text completions, Ollama /api/chat (NDJSON) and
/api/generate, a client that disconnects mid-stream, and bad requests that must be 400s (a
missing model, an unknown field type, a prompt over the context). An answer counts as an error
when its status is not the one expected for its kind (200, or 400 for the bad ones), when a
stream ends without its terminator, or when the connection fails.
"""

import argparse
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from urllib.parse import urlparse

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "smollm2-135m-instruct"
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain what a hash map is in one sentence.",
    "Say hello in Spanish.",
    "What is 12 times 7?",
]
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
    "required": ["city", "population"],
    "additionalProperties": False,
}
WEATHER = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Client:
    def __init__(self, base):
        u = urlparse(base)
        self.host, self.port = u.hostname, u.port or 80

    def request(self, method, path, body, stream=False, drop_after=None):
        """(status, ok) — `ok` is False when a stream ended without its terminator."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=300)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            if not stream or r.status != 200:
                r.read()
                return r.status, True
            seen = 0
            last = b""
            while True:
                line = r.readline()
                if not line:
                    break
                if line.strip():
                    last = line.strip()
                    seen += 1
                if drop_after is not None and seen >= drop_after:
                    return r.status, True  # the client goes away mid-stream
            done = last == b"data: [DONE]" or (last.startswith(b"{") and json.loads(last).get("done") is True)
            return r.status, done
        finally:
            conn.close()


def one(client, rng):
    """Send one request of a random kind; returns (kind, expected status, status, ok)."""
    q = rng.choice(QUESTIONS)
    msgs = [{"role": "user", "content": q}]
    kind = rng.choices(
        ["chat", "chat_stream", "json_schema", "tool", "completion", "ollama_chat", "ollama_generate", "drop", "bad"],
        weights=[4, 4, 1, 1, 2, 2, 1, 1, 1],
    )[0]
    mt = rng.randint(8, 48)
    if kind == "chat":
        s, ok = client.request("POST", "/v1/chat/completions", {"model": MODEL, "messages": msgs, "max_tokens": mt})
    elif kind == "chat_stream":
        s, ok = client.request(
            "POST",
            "/v1/chat/completions",
            {"model": MODEL, "messages": msgs, "max_tokens": mt, "stream": True, "stream_options": {"include_usage": True}},
            stream=True,
        )
    elif kind == "json_schema":
        s, ok = client.request(
            "POST",
            "/v1/chat/completions",
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": "Give a city and its population as JSON."}],
                "max_tokens": 60,
                "response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}},
            },
        )
    elif kind == "tool":
        s, ok = client.request(
            "POST",
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "Weather in Oslo?"}], "max_tokens": 60, "tools": WEATHER, "tool_choice": "required"},
        )
    elif kind == "completion":
        s, ok = client.request("POST", "/v1/completions", {"model": MODEL, "prompt": q, "max_tokens": mt})
    elif kind == "ollama_chat":
        s, ok = client.request("POST", "/api/chat", {"model": MODEL, "messages": msgs, "options": {"num_predict": mt}}, stream=True)
    elif kind == "ollama_generate":
        s, ok = client.request("POST", "/api/generate", {"model": MODEL, "prompt": q, "stream": False, "options": {"num_predict": mt}})
    elif kind == "drop":
        s, ok = client.request(
            "POST", "/v1/chat/completions", {"model": MODEL, "messages": msgs, "max_tokens": 200, "stream": True}, stream=True, drop_after=3
        )
    else:
        body = rng.choice(
            [
                {"model": "no-such-model", "messages": msgs},
                {"model": MODEL, "messages": msgs, "max_tokens": "many"},
                {"model": MODEL, "messages": [{"role": "user", "content": "word " * 20000}]},
            ]
        )
        s, ok = client.request("POST", "/v1/chat/completions", body)
        return kind, (400, 404), s, ok
    return kind, (200,), s, ok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--report", type=float, default=30.0, help="seconds between progress lines")
    ap.add_argument("--base", help="a running server (default: start target/release/ferrolm serve)")
    ap.add_argument("--pid", type=int, help="the running server's pid, for its RSS")
    ap.add_argument("--binary", default=os.path.join(REPO_ROOT, "target", "release", "ferrolm"))
    ap.add_argument("--threads", type=int, default=2, help="engine threads of the started server")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", help="also write the summary here")
    args = ap.parse_args()

    server = None
    data_dir = None
    if args.base:
        base, pid = args.base, args.pid
    else:
        port = free_port()
        data_dir = tempfile.mkdtemp(prefix="ferrolm-soak-")
        server = subprocess.Popen(
            [args.binary, "serve", "--port", str(port), "--threads", str(args.threads), "--data-dir", data_dir],
            stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(data_dir, "server.log"), "w"),
        )
        base, pid = f"http://127.0.0.1:{port}", server.pid
        deadline = time.time() + 120
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline or server.poll() is not None:
                sys.exit(f"the server did not start: see {data_dir}/server.log")
            time.sleep(0.5)

    client = Client(base)
    stop = time.time() + args.minutes * 60
    lock = threading.Lock()
    statuses = Counter()
    errors = Counter()
    kinds = Counter()
    done = [0]

    def worker(i):
        rng = random.Random(args.seed * 1000 + i)
        while time.time() < stop:
            try:
                kind, want, status, ok = one(client, rng)
                err = None if (status in want and ok) else (f"{status}" if ok else f"{status} (stream cut)")
            except Exception as e:  # noqa: BLE001 - every failure is counted
                kind, err, status = "?", f"{type(e).__name__}: {e}"[:80], None
            with lock:
                done[0] += 1
                kinds[kind] += 1
                statuses[status] += 1
                if err:
                    errors[f"{kind}: {err}"] += 1

    t0 = time.time()
    rss0 = rss_mib(pid) if pid else None
    samples = [(0.0, 0, rss0)]
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(args.concurrency)]
    for t in threads:
        t.start()
    next_report = t0 + args.report
    while any(t.is_alive() for t in threads):
        time.sleep(0.5)
        if time.time() >= next_report:
            next_report += args.report
            rss = rss_mib(pid) if pid else None
            with lock:
                n, nerr = done[0], sum(errors.values())
            samples.append((time.time() - t0, n, rss))
            rss_s = f"{rss:.1f} MiB" if rss is not None else "?"
            print(f"{time.time() - t0:7.0f} s  {n:6d} requests  {nerr:4d} errors  RSS {rss_s}", flush=True)
    for t in threads:
        t.join()
    elapsed = time.time() - t0
    rss_end = rss_mib(pid) if pid else None
    samples.append((elapsed, done[0], rss_end))

    # Growth per 1,000 requests over the second half of the run: the KV pool's pages (and the
    # prefix cache in them) become resident as they are first written, which takes a few
    # minutes of traffic; what grows after that is what would grow without bound.
    warm = next((s for s in samples if s[0] >= elapsed / 2 and s[2] is not None), None)
    growth = None
    if warm and rss_end is not None and done[0] > warm[1]:
        growth = (rss_end - warm[2]) / (done[0] - warm[1]) * 1000
    summary = {
        "minutes": round(elapsed / 60, 2),
        "concurrency": args.concurrency,
        "requests": done[0],
        "requests_per_s": round(done[0] / elapsed, 2),
        "by_kind": dict(kinds),
        "by_status": {str(k): v for k, v in statuses.items()},
        "errors": sum(errors.values()),
        "errors_by_kind": dict(errors),
        "rss_mib": {"start": rss0, "at_half_time": warm[2] if warm else None, "end": rss_end,
                    "max": max((s[2] for s in samples if s[2] is not None), default=None)},
        "rss_growth_mib_per_1000_requests_second_half": None if growth is None else round(growth, 3),
        "rss_samples": [{"s": round(a, 1), "requests": b, "rss_mib": c} for a, b, c in samples],
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "rss_samples"}, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    if server:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            print("the server did not stop within 30 s of SIGTERM", file=sys.stderr)
            summary["errors"] += 1
        shutil.rmtree(data_dir, ignore_errors=True)
    sys.exit(1 if summary["errors"] else 0)


if __name__ == "__main__":
    main()
