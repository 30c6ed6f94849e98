#!/usr/bin/env python3
"""Load generator for OpenAI-compatible chat servers (ferrolm serve, llama-server).

Standard library only (threads + http.client). Loopback servers only: a URL whose
host does not resolve to loopback addresses only is refused. Bounded: the number
of requests is fixed in advance (and capped by --max-requests) and the whole run
stops issuing requests after --max-seconds (in-flight requests are cut
--grace-seconds later).

Every request is `POST /v1/chat/completions` with stream: true,
stream_options: {include_usage: true}, temperature 0, a fixed max_tokens and
(unless --no-ignore-eos) "ignore_eos": true, so that every request should
generate exactly max_tokens tokens. A server may ignore ignore_eos: the actual
completion tokens are reported (from the usage chunk; without one, the number of
non-empty content chunks is used). Prompts are windows of --prompt-words words
from tinyshakespeare at random offsets, so no two requests share a prompt.

Modes
-----
Single server (default):
  python3 scripts/loadgen.py --url http://127.0.0.1:8080 \\
      --concurrency 1,4,8,16 --requests-per-stream 4 --max-tokens 128 \\
      [--prompt-words 100] [--rounds 1] [--label NAME] [--json FILE]
  At concurrency C, C threads ("streams") each send --requests-per-stream
  requests one after another. Per level it reports: aggregate output tokens/s
  (total completion tokens / wall time of the level, first request sent to last
  response finished), request/s, p50/p99 time to first content token (TTFT),
  mean inter-token latency (per request (t_last_content - t_first_content) /
  (completion_tokens - 1), averaged over requests), mean completion tokens,
  p50 end-to-end latency, errors (HTTP status + body, connection refused, ...).

Interleaved comparison of two servers:
  python3 scripts/loadgen.py --compare http://127.0.0.1:8080 http://127.0.0.1:18090 \\
      --names ferrolm,llama.cpp --concurrency 1,4,8,16 --rounds 3 [--json FILE]
  For each round, for each level: level on A, then the same level on B (the
  order A/B is swapped in every other round unless --order fixed). Reports,
  per level, the median over rounds of each figure for A and B and the ratio
  A/B (for tokens/s higher is better, for latencies lower is better).

Cached-prefix test (--cached-prefix-test, alone or with --compare):
  Each round builds a system prompt of --prefix-words words (about 1,000
  tokens by default) that starts with a random nonce, so no server can have it
  cached; request 1 (uncached) sends it with one user message, then
  --cached-per-round requests (cached) send the same system prompt with a
  different user message. Reports median TTFT uncached vs cached and the ratio
  uncached/cached (the speed-up from prefix caching), plus the prompt tokens
  and the cached tokens the server reports when it does. The requests are
  sequential (concurrency 1) with --prefix-max-tokens (default 8).

Before measuring, --warmup (default 1) short requests are sent to each server
(not counted). Exit status: 0 when every request succeeded, 1 when some failed,
2 on usage errors.
"""

import argparse
import datetime
import http.client
import ipaddress
import json
import os
import platform
import random
import socket
import statistics
import sys
import threading
import time
import urllib.parse

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CORPUS = os.path.normpath(os.path.join(REPO_ROOT, "data", "tinyshakespeare.txt"))
MAX_ERROR_BODY = 2000


def die(msg, code=2):
    sys.stderr.write(f"loadgen.py: error: {msg}\n")
    sys.exit(code)


def log(msg):
    sys.stderr.write(f"[loadgen {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


# ----------------------------------------------------------------------------
# statistics helpers


def percentile(xs, p):
    """Linear-interpolated percentile (numpy's default), None for no data."""
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    if len(xs) == 1:
        return xs[0]
    k = (len(xs) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


# ----------------------------------------------------------------------------
# target URL handling


class Target:
    """One server: base URL (http://host:port[/prefix]) checked to be loopback."""

    def __init__(self, base_url, name, model=None):
        u = urllib.parse.urlsplit(base_url if "://" in base_url else "http://" + base_url)
        if u.scheme != "http":
            die(f"{base_url}: only plain http:// URLs are supported")
        if not u.hostname:
            die(f"{base_url}: no host")
        self.host = u.hostname
        self.port = u.port or 80
        path = u.path.rstrip("/")
        if path.endswith("/v1"):
            path = path[: -len("/v1")]
        self.prefix = path
        self.base_url = f"http://{self.host if ':' not in self.host else '[' + self.host + ']'}:{self.port}{self.prefix}"
        self.name = name
        self.model = model
        self._check_loopback()

    def _check_loopback(self):
        try:
            infos = socket.getaddrinfo(self.host, self.port, proto=socket.IPPROTO_TCP)
        except socket.gaierror as e:
            die(f"{self.host}: cannot resolve: {e}")
        addrs = {info[4][0] for info in infos}
        for a in addrs:
            try:
                ip = ipaddress.ip_address(a.split("%", 1)[0])
            except ValueError:
                die(f"{self.host}: unexpected address {a}")
            if not ip.is_loopback:
                die(f"{self.host} resolves to {a}, which is not loopback: this tool only drives local servers")
        if not addrs:
            die(f"{self.host}: no address")

    def conn(self, timeout):
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def path(self, p):
        return self.prefix + p

    def detect_model(self, timeout=10.0):
        """GET /v1/models; returns (model id or None, error string or None)."""
        try:
            c = self.conn(timeout)
            try:
                c.request("GET", self.path("/v1/models"))
                r = c.getresponse()
                body = r.read(1 << 20)
            finally:
                c.close()
        except (OSError, http.client.HTTPException) as e:
            return None, describe_exc(e)
        if r.status != 200:
            return None, f"HTTP {r.status}: {body[:300].decode('utf-8', 'replace')}"
        try:
            data = json.loads(body)
            models = data.get("data") or data.get("models") or []
            for m in models:
                mid = m.get("id") or m.get("name") or m.get("model")
                if mid:
                    return mid, None
        except (ValueError, AttributeError):
            pass
        return None, None


def describe_exc(e):
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, socket.timeout):
        return "timeout"
    return f"{type(e).__name__}: {e}"


# ----------------------------------------------------------------------------
# prompts


class Corpus:
    def __init__(self, path, seed):
        try:
            with open(path, encoding="utf-8") as f:
                self.words = f.read().split()
        except OSError as e:
            die(f"cannot read corpus {path}: {e}")
        if len(self.words) < 2000:
            die(f"corpus {path} is too small ({len(self.words)} words)")
        self.rng = random.Random(seed)
        self.lock = threading.Lock()

    def window(self, n_words):
        n_words = max(1, min(n_words, len(self.words) - 1))
        with self.lock:
            start = self.rng.randrange(0, len(self.words) - n_words)
        return " ".join(self.words[start : start + n_words])

    def nonce(self):
        with self.lock:
            return "%016x" % self.rng.getrandbits(64)


def load_messages(corpus, prompt_words):
    text = corpus.window(prompt_words)
    return [{"role": "user", "content": "Continue this passage from a play:\n\n" + text}]


# ----------------------------------------------------------------------------
# one streamed request


class Deadline:
    def __init__(self, soft_s, grace_s):
        self.t0 = time.perf_counter()
        self.soft = self.t0 + soft_s
        self.hard = self.soft + grace_s

    def soft_passed(self):
        return time.perf_counter() > self.soft

    def hard_remaining(self):
        return self.hard - time.perf_counter()


def handle_sse_data(data, now, t0, origin, res, usage):
    """Process the data of one SSE event. Returns (stop, got_done, usage)."""
    payloads = [data]
    if "\n" in data:
        try:
            json.loads(data)
        except ValueError:
            # a server that omits the blank line between events: one JSON per line
            payloads = [x for x in data.split("\n") if x.strip()]
    for payload in payloads:
        if payload.strip() == "[DONE]":
            return True, True, usage
        try:
            ev = json.loads(payload)
        except ValueError:
            res["error"] = f"bad SSE JSON: {payload[:300]}"
            return True, False, usage
        if not isinstance(ev, dict):
            continue
        if ev.get("error"):
            res["error"] = "error event: " + json.dumps(ev["error"])[:MAX_ERROR_BODY]
            return True, False, usage
        for ch in ev.get("choices") or []:
            delta = ch.get("delta") or {}
            content = delta.get("content")
            if content is None:
                content = ch.get("text")  # tolerate completions-style chunks
            if content:
                if res["t_first_content"] is None:
                    res["t_first_content"] = now - origin
                    res["ttft"] = now - t0
                res["t_last_content"] = now - origin
                res["content_chunks"] += 1
                res["content_chars"] += len(content)
            if ch.get("finish_reason"):
                res["finish_reason"] = ch["finish_reason"]
        if ev.get("usage"):
            usage = ev["usage"]
        if isinstance(ev.get("timings"), dict):  # llama-server extension
            res["timings"] = ev["timings"]
    return False, False, usage


def stream_chat(target, messages, args, deadline, max_tokens=None, t_origin=None):
    """Send one streaming chat completion. Returns a dict of measurements.

    Times are seconds relative to t_origin (perf_counter) for start/end, and
    durations for ttft/e2e.
    """
    max_tokens = args.max_tokens if max_tokens is None else max_tokens
    body = {
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    if target.model:
        body["model"] = target.model
    if not args.no_ignore_eos:
        body["ignore_eos"] = True
    payload = json.dumps(body).encode("utf-8")
    res = {
        "ok": False,
        "error": None,
        "status": None,
        "ttft": None,
        "e2e": None,
        "completion_tokens": None,
        "completion_tokens_source": None,
        "prompt_tokens": None,
        "cached_tokens": None,
        "content_chunks": 0,
        "content_chars": 0,
        "t_first_content": None,
        "t_last_content": None,
        "finish_reason": None,
        "itl": None,
    }
    origin = t_origin if t_origin is not None else time.perf_counter()
    t0 = time.perf_counter()
    res["start"] = t0 - origin
    timeout = max(0.1, min(args.request_timeout, deadline.hard_remaining()))
    conn = None
    got_done = False
    usage = None
    try:
        conn = target.conn(timeout)
        conn.request(
            "POST",
            target.path("/v1/chat/completions"),
            body=payload,
            headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
        )
        resp = conn.getresponse()
        res["status"] = resp.status
        if resp.status != 200:
            err_body = resp.read(MAX_ERROR_BODY).decode("utf-8", "replace")
            res["error"] = f"HTTP {resp.status} {resp.reason}: {err_body.strip()}"
            return res
        ctype = resp.getheader("Content-Type", "")
        data_lines = []
        while True:
            if deadline.hard_remaining() <= 0:
                res["error"] = "cut at --max-seconds + --grace-seconds"
                break
            line = resp.readline(1 << 20)
            if not line:
                if data_lines:  # event not terminated by a blank line
                    pass
                else:
                    break
            s = line.decode("utf-8", "replace").rstrip("\r\n") if line else ""
            if s.startswith(":"):
                continue
            if s.startswith("data:"):
                v = s[5:]
                if v.startswith(" "):
                    v = v[1:]
                data_lines.append(v)
                if line:
                    continue
            elif s:
                # event:, id:, retry: or an unexpected field; ignore
                if line:
                    continue
            # blank line (or EOF): dispatch the event
            if data_lines:
                data = "\n".join(data_lines)
                data_lines = []
                now = time.perf_counter()
                stop, got_done, usage = handle_sse_data(data, now, t0, origin, res, usage)
                if stop:
                    break
            if not line:
                break
        if res["error"] is None and not got_done:
            if "text/event-stream" not in ctype:
                res["error"] = f"not an SSE response (Content-Type {ctype!r})"
            else:
                res["error"] = "stream ended without data: [DONE]"
    except (OSError, http.client.HTTPException) as e:
        res["error"] = describe_exc(e)
    finally:
        if conn is not None:
            conn.close()
        t1 = time.perf_counter()
        res["end"] = t1 - origin
        res["e2e"] = t1 - t0
    if usage:
        res["prompt_tokens"] = usage.get("prompt_tokens")
        if usage.get("completion_tokens") is not None:
            res["completion_tokens"] = usage.get("completion_tokens")
            res["completion_tokens_source"] = "usage"
        details = usage.get("prompt_tokens_details") or {}
        if isinstance(details, dict) and details.get("cached_tokens") is not None:
            res["cached_tokens"] = details.get("cached_tokens")
    if res["cached_tokens"] is None and isinstance(res.get("timings"), dict) and "cache_n" in res["timings"]:
        res["cached_tokens"] = res["timings"]["cache_n"]
    if res["completion_tokens"] is None:
        res["completion_tokens"] = res["content_chunks"]
        res["completion_tokens_source"] = "content_chunks"
    n = res["completion_tokens"]
    if res["t_first_content"] is not None and n and n > 1:
        res["itl"] = (res["t_last_content"] - res["t_first_content"]) / (n - 1)
    res["ok"] = res["error"] is None
    return res


# ----------------------------------------------------------------------------
# a concurrency level


def run_level(target, corpus, args, concurrency, deadline):
    results = [[] for _ in range(concurrency)]
    origin = time.perf_counter()

    def worker(i):
        for _ in range(args.requests_per_stream):
            if deadline.soft_passed():
                break
            msgs = load_messages(corpus, args.prompt_words)
            results[i].append(stream_chat(target, msgs, args, deadline, t_origin=origin))

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - origin
    reqs = [r for rs in results for r in rs]
    return summarize_level(target, concurrency, reqs, wall, args)


def summarize_level(target, concurrency, reqs, wall, args):
    ok = [r for r in reqs if r["ok"]]
    errs = [r for r in reqs if not r["ok"]]
    total_tokens = sum(r["completion_tokens"] or 0 for r in ok)
    if reqs:
        span = max(r["end"] for r in reqs) - min(r["start"] for r in reqs)
    else:
        span = wall
    span = span if span > 0 else None
    ttfts = [r["ttft"] for r in ok]
    error_samples = []
    for r in errs:
        if r["error"] not in error_samples:
            error_samples.append(r["error"])
        if len(error_samples) >= 5:
            break
    planned = concurrency * args.requests_per_stream
    s = {
        "server": target.name,
        "url": target.base_url,
        "concurrency": concurrency,
        "requests_planned": planned,
        "requests_sent": len(reqs),
        "requests_ok": len(ok),
        "errors": len(errs),
        "error_samples": error_samples,
        "wall_s": span,
        "completion_tokens_total": total_tokens,
        "output_tok_s": (total_tokens / span) if span else None,
        "req_s": (len(ok) / span) if span else None,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "ttft_mean_s": mean(ttfts),
        "itl_mean_s": mean([r["itl"] for r in ok]),
        "e2e_p50_s": percentile([r["e2e"] for r in ok], 50),
        "completion_tokens_mean": mean([r["completion_tokens"] for r in ok]),
        "prompt_tokens_mean": mean([r["prompt_tokens"] for r in ok]),
        "hit_max_tokens": sum(1 for r in ok if r["completion_tokens"] == args.max_tokens),
        "completion_tokens_source": sorted({r["completion_tokens_source"] for r in ok}),
        "requests": reqs,
    }
    return s


# ----------------------------------------------------------------------------
# cached-prefix test round


def run_prefix_round(target, corpus, args, deadline):
    """One round: uncached request, then --cached-per-round cached ones."""
    nonce = corpus.nonce()
    fixed = corpus.window(args.prefix_words)
    system = (
        f"Session {nonce}. You are a helpful assistant that knows the following text by heart.\n\n"
        + fixed
    )
    out = {"uncached": None, "cached": []}
    question = corpus.window(12)
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "Quote this line: " + question}]
    out["uncached"] = stream_chat(target, msgs, args, deadline, max_tokens=args.prefix_max_tokens)
    for _ in range(args.cached_per_round):
        if deadline.soft_passed():
            break
        question = corpus.window(12)
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": "Explain this line: " + question}]
        out["cached"].append(stream_chat(target, msgs, args, deadline, max_tokens=args.prefix_max_tokens))
    return out


def summarize_prefix(target, rounds):
    unc = [r["uncached"] for r in rounds if r["uncached"] is not None]
    cac = [c for r in rounds for c in r["cached"]]
    unc_ok = [r for r in unc if r["ok"]]
    cac_ok = [r for r in cac if r["ok"]]
    errs = [r for r in unc + cac if not r["ok"]]
    u = median([r["ttft"] for r in unc_ok])
    c = median([r["ttft"] for r in cac_ok])
    return {
        "server": target.name,
        "url": target.base_url,
        "rounds": len(rounds),
        "uncached_ok": len(unc_ok),
        "cached_ok": len(cac_ok),
        "errors": len(errs),
        "error_samples": list(dict.fromkeys(r["error"] for r in errs))[:5],
        "ttft_uncached_median_s": u,
        "ttft_cached_median_s": c,
        "speedup_uncached_over_cached": ratio(u, c),
        "prompt_tokens_uncached_median": median([r["prompt_tokens"] for r in unc_ok]),
        "prompt_tokens_cached_median": median([r["prompt_tokens"] for r in cac_ok]),
        "cached_tokens_reported_median": median([r["cached_tokens"] for r in cac_ok]),
        "round_data": rounds,
    }


# ----------------------------------------------------------------------------
# output


def fmt(v, scale=1.0, digits=1):
    if v is None:
        return "-"
    return f"{v * scale:.{digits}f}"


def fmt_ratio(v):
    return "-" if v is None else f"{v:.2f}x"


def print_levels_table(levels, max_tokens):
    hdr = (
        f"{'server':<12} {'conc':>4} {'ok/sent':>8} {'err':>4} {'wall s':>7} {'out tok/s':>9} {'req/s':>6} "
        f"{'TTFT p50 ms':>11} {'TTFT p99 ms':>11} {'ITL ms':>7} {'e2e p50 s':>9} {'tok/req':>7} {'=max':>5}"
    )
    print(hdr)
    print("-" * len(hdr))
    for s in levels:
        print(
            f"{s['server'][:12]:<12} {s['concurrency']:>4} {str(s['requests_ok']) + '/' + str(s['requests_sent']):>8} "
            f"{s['errors']:>4} {fmt(s['wall_s'], 1, 2):>7} {fmt(s['output_tok_s']):>9} {fmt(s['req_s'], 1, 2):>6} "
            f"{fmt(s['ttft_p50_s'], 1000):>11} {fmt(s['ttft_p99_s'], 1000):>11} {fmt(s['itl_mean_s'], 1000, 2):>7} "
            f"{fmt(s['e2e_p50_s'], 1, 2):>9} {fmt(s['completion_tokens_mean']):>7} "
            f"{str(s['hit_max_tokens']) + '/' + str(s['requests_ok']):>5}"
        )
    print(f"(=max: requests that generated exactly max_tokens={max_tokens}; tok/req below it means EOS was not ignored)")
    for s in levels:
        for e in s["error_samples"]:
            print(f"  error [{s['server']} c={s['concurrency']}]: {e[:500]}")


def print_prefix_table(prefixes):
    if not prefixes:
        return
    print()
    print("Cached-prefix test (median TTFT, sequential requests)")
    hdr = f"{'server':<12} {'rounds':>6} {'err':>4} {'prompt tok':>10} {'cached tok':>10} {'uncached ms':>11} {'cached ms':>9} {'speed-up':>8}"
    print(hdr)
    print("-" * len(hdr))
    for p in prefixes:
        print(
            f"{p['server'][:12]:<12} {p['rounds']:>6} {p['errors']:>4} {fmt(p['prompt_tokens_uncached_median'], 1, 0):>10} "
            f"{fmt(p['cached_tokens_reported_median'], 1, 0):>10} {fmt(p['ttft_uncached_median_s'], 1000):>11} "
            f"{fmt(p['ttft_cached_median_s'], 1000):>9} {fmt_ratio(p['speedup_uncached_over_cached']):>8}"
        )
        for e in p["error_samples"]:
            print(f"  error [{p['server']} prefix]: {e[:500]}")


COMPARE_METRICS = [
    ("output_tok_s", "out tok/s", 1.0, 1, "higher"),
    ("ttft_p50_s", "TTFT p50 ms", 1000.0, 1, "lower"),
    ("ttft_p99_s", "TTFT p99 ms", 1000.0, 1, "lower"),
    ("itl_mean_s", "ITL ms", 1000.0, 2, "lower"),
    ("completion_tokens_mean", "tok/req", 1.0, 1, None),
]


def compare_summary(levels_a, levels_b, concurrencies):
    out = []
    for c in concurrencies:
        la = [s for s in levels_a if s["concurrency"] == c]
        lb = [s for s in levels_b if s["concurrency"] == c]
        row = {"concurrency": c, "rounds_a": len(la), "rounds_b": len(lb),
               "errors_a": sum(s["errors"] for s in la), "errors_b": sum(s["errors"] for s in lb)}
        for key, _, _, _, _ in COMPARE_METRICS:
            a = median([s[key] for s in la])
            b = median([s[key] for s in lb])
            row[key] = {"a_median": a, "b_median": b, "ratio_a_over_b": ratio(a, b),
                        "a_all": [s[key] for s in la], "b_all": [s[key] for s in lb]}
        out.append(row)
    return out


def print_compare(summary, name_a, name_b):
    print()
    print(f"Comparison A={name_a} vs B={name_b}: medians over rounds, ratio A/B "
          "(tok/s: >1 means A faster; latencies: <1 means A faster)")
    hdr = f"{'conc':>4} {'err A/B':>8} " + " ".join(
        f"{title + ' A':>14} {title + ' B':>14} {'A/B':>6}" for _, title, _, _, _ in COMPARE_METRICS[:4]
    )
    print(hdr)
    print("-" * len(hdr))
    for row in summary:
        cells = []
        for key, title, scale, digits, _ in COMPARE_METRICS[:4]:
            m = row[key]
            cells.append(f"{fmt(m['a_median'], scale, digits):>14} {fmt(m['b_median'], scale, digits):>14} "
                         f"{fmt_ratio(m['ratio_a_over_b']):>6}")
        print(f"{row['concurrency']:>4} {str(row['errors_a']) + '/' + str(row['errors_b']):>8} " + " ".join(cells))
    print("tokens per request (median) A/B: " + ", ".join(
        f"c={row['concurrency']}: {fmt(row['completion_tokens_mean']['a_median'])}/{fmt(row['completion_tokens_mean']['b_median'])}"
        for row in summary))


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
        with open("/proc/loadavg") as f:
            la = [float(x) for x in f.read().split()[:3]]
    except OSError:
        la = None
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "loadavg": la}


def strip_requests(obj, keep):
    """Drop per-request records from the JSON unless --json-requests."""
    if keep:
        return obj
    if isinstance(obj, dict):
        return {k: strip_requests(v, keep) for k, v in obj.items() if k not in ("requests", "round_data")}
    if isinstance(obj, list):
        return [strip_requests(v, keep) for v in obj]
    return obj


# ----------------------------------------------------------------------------
# main


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Streaming load generator for OpenAI-compatible chat servers on loopback.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Modes\n-----\n", 1)[1],
    )
    p.add_argument("--url", default="http://127.0.0.1:8080", help="base URL of the server (single-server mode)")
    p.add_argument("--compare", nargs=2, metavar=("URL_A", "URL_B"), help="interleaved comparison of two servers")
    p.add_argument("--names", default=None, help="names for the servers, comma separated (default: A,B or 'server')")
    p.add_argument("--model", default=None, help="model field to send (default: first id of GET /v1/models)")
    p.add_argument("--concurrency", default="1,4,8,16", help="comma-separated concurrency levels (default 1,4,8,16)")
    p.add_argument("--requests-per-stream", type=int, default=4, help="requests each concurrent stream sends (default 4)")
    p.add_argument("--rounds", type=int, default=1, help="repeat all levels this many times (default 1)")
    p.add_argument("--order", choices=("alternate", "fixed"), default="alternate",
                   help="compare mode: swap A/B order every other round (alternate, default) or always A first")
    p.add_argument("--max-tokens", type=int, default=128, help="max_tokens per request (default 128)")
    p.add_argument("--prompt-words", type=int, default=100, help="words of tinyshakespeare per prompt (default 100)")
    p.add_argument("--no-ignore-eos", action="store_true", help="do not send \"ignore_eos\": true")
    p.add_argument("--corpus", default=DEFAULT_CORPUS, help=f"prompt corpus (default {DEFAULT_CORPUS})")
    p.add_argument("--seed", type=int, default=1234, help="RNG seed for prompt windows and nonces")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured warm-up requests per server (default 1)")
    p.add_argument("--cached-prefix-test", action="store_true", help="run the cached-prefix TTFT test")
    p.add_argument("--prefix-only", action="store_true", help="run only the cached-prefix test, no concurrency levels")
    p.add_argument("--prefix-rounds", type=int, default=5, help="cached-prefix rounds (default 5)")
    p.add_argument("--cached-per-round", type=int, default=2, help="cached requests per prefix round (default 2)")
    p.add_argument("--prefix-words", type=int, default=700,
                   help="words in the shared system prompt (default 700, about 1,000 tokens)")
    p.add_argument("--prefix-max-tokens", type=int, default=8, help="max_tokens in the cached-prefix test (default 8)")
    p.add_argument("--max-seconds", type=float, default=900.0,
                   help="stop issuing requests after this many seconds (default 900)")
    p.add_argument("--grace-seconds", type=float, default=60.0,
                   help="cut in-flight requests this long after --max-seconds (default 60)")
    p.add_argument("--request-timeout", type=float, default=300.0, help="socket timeout per request in s (default 300)")
    p.add_argument("--max-requests", type=int, default=5000, help="refuse plans with more requests than this (default 5000)")
    p.add_argument("--label", default=None, help="free-form tag stored with the results")
    p.add_argument("--json", dest="json_out", default=None, help="write all results as JSON to this file")
    p.add_argument("--json-requests", action="store_true", help="include every request's record in the JSON")
    args = p.parse_args(argv)
    try:
        args.levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    except ValueError:
        die(f"--concurrency: expected comma-separated integers, got {args.concurrency!r}")
    if not args.levels or any(c < 1 or c > 256 for c in args.levels):
        die("--concurrency: levels must be between 1 and 256")
    for name in ("requests_per_stream", "rounds", "max_tokens", "prompt_words", "prefix_rounds", "prefix_words",
                 "prefix_max_tokens", "max_requests"):
        if getattr(args, name) < 1:
            die(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_tokens > 8192 or args.prefix_max_tokens > 8192:
        die("--max-tokens / --prefix-max-tokens: at most 8192")
    if args.cached_per_round < 1:
        die("--cached-per-round must be >= 1")
    if args.warmup < 0 or args.max_seconds <= 0 or args.grace_seconds < 0 or args.request_timeout <= 0:
        die("--warmup, --max-seconds, --grace-seconds and --request-timeout must be positive")
    if args.prefix_only:
        args.cached_prefix_test = True
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.compare:
        urls = list(args.compare)
        default_names = ["A", "B"]
    else:
        urls = [args.url]
        default_names = ["server"]
    names = args.names.split(",") if args.names else default_names
    if len(names) != len(urls):
        die(f"--names: expected {len(urls)} names")
    targets = [Target(u, n, args.model) for u, n in zip(urls, names)]

    n_servers = len(targets)
    planned = args.warmup * n_servers
    if not args.prefix_only:
        planned += n_servers * args.rounds * sum(c * args.requests_per_stream for c in args.levels)
    if args.cached_prefix_test:
        planned += n_servers * args.prefix_rounds * (1 + args.cached_per_round)
    if planned > args.max_requests:
        die(f"the plan has {planned} requests, more than --max-requests {args.max_requests}")

    corpus = Corpus(args.corpus, args.seed)
    deadline = Deadline(args.max_seconds, args.grace_seconds)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    log(f"plan: {planned} requests at most, stop issuing after {args.max_seconds:.0f}s")

    # preflight: model id and reachability
    for t in targets:
        mid, err = t.detect_model()
        if err:
            log(f"warning: {t.name} ({t.base_url}) GET /v1/models failed: {err}")
        if t.model is None and mid:
            t.model = mid
        log(f"{t.name}: {t.base_url} model={t.model!r}")

    for t in targets:
        for i in range(args.warmup):
            r = stream_chat(t, load_messages(corpus, args.prompt_words), args, deadline, max_tokens=8)
            log(f"warm-up {t.name}: {'ok' if r['ok'] else 'FAILED: ' + str(r['error'])[:300]}")

    def order_for(round_idx):
        if n_servers == 2 and args.order == "alternate" and round_idx % 2 == 1:
            return list(reversed(targets))
        return list(targets)

    levels_by_server = {t.name: [] for t in targets}
    all_levels = []
    skipped = []
    if not args.prefix_only:
        for rnd in range(args.rounds):
            for c in args.levels:
                for t in order_for(rnd):
                    if deadline.soft_passed():
                        skipped.append({"server": t.name, "round": rnd + 1, "concurrency": c})
                        continue
                    log(f"round {rnd + 1}/{args.rounds} {t.name} concurrency {c} ...")
                    s = run_level(t, corpus, args, c, deadline)
                    s["round"] = rnd + 1
                    levels_by_server[t.name].append(s)
                    all_levels.append(s)
                    log(f"  {t.name} c={c}: {fmt(s['output_tok_s'])} tok/s, TTFT p50 {fmt(s['ttft_p50_s'], 1000)} ms, "
                        f"errors {s['errors']}")

    prefix_rounds = {t.name: [] for t in targets}
    if args.cached_prefix_test:
        for rnd in range(args.prefix_rounds):
            for t in order_for(rnd):
                if deadline.soft_passed():
                    skipped.append({"server": t.name, "prefix_round": rnd + 1})
                    continue
                log(f"prefix round {rnd + 1}/{args.prefix_rounds} {t.name} ...")
                prefix_rounds[t.name].append(run_prefix_round(t, corpus, args, deadline))
    prefixes = [summarize_prefix(t, prefix_rounds[t.name]) for t in targets] if args.cached_prefix_test else []

    # ---- report
    print()
    print(f"loadgen  label={args.label!r}  started={started}  max_tokens={args.max_tokens}  "
          f"prompt_words={args.prompt_words}  requests/stream={args.requests_per_stream}  rounds={args.rounds}  "
          f"ignore_eos={'no' if args.no_ignore_eos else 'yes'}")
    mi = machine_info()
    print(f"machine: {mi['cpu']}, {mi['cores']} cores, loadavg {mi['loadavg']}")
    for t in targets:
        print(f"  {t.name}: {t.base_url} model={t.model!r}")
    print()
    if all_levels:
        print_levels_table(all_levels, args.max_tokens)
    compare = None
    if n_servers == 2 and all_levels:
        compare = compare_summary(levels_by_server[targets[0].name], levels_by_server[targets[1].name], args.levels)
        print_compare(compare, targets[0].name, targets[1].name)
    print_prefix_table(prefixes)
    if n_servers == 2 and len(prefixes) == 2:
        a, b = prefixes
        print(f"cached TTFT A/B: {fmt_ratio(ratio(a['ttft_cached_median_s'], b['ttft_cached_median_s']))}, "
              f"uncached TTFT A/B: {fmt_ratio(ratio(a['ttft_uncached_median_s'], b['ttft_uncached_median_s']))}")
    if skipped:
        print(f"\nskipped after --max-seconds: {skipped}")

    total_errors = sum(s["errors"] for s in all_levels) + sum(p["errors"] for p in prefixes)
    if args.json_out:
        doc = {
            "tool": "loadgen.py",
            "label": args.label,
            "started": started,
            "machine": mi,
            "config": {k: v for k, v in vars(args).items() if k not in ("json_out",)},
            "servers": [{"name": t.name, "url": t.base_url, "model": t.model} for t in targets],
            "levels": all_levels,
            "compare": compare,
            "cached_prefix": prefixes,
            "skipped": skipped,
            "total_errors": total_errors,
        }
        doc = strip_requests(doc, args.json_requests)
        with open(args.json_out, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"\nwrote {args.json_out}")
    return 1 if total_errors else 0


if __name__ == "__main__":
    sys.exit(main())
