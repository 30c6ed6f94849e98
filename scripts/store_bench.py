#!/usr/bin/env python3
"""What a shared PostgreSQL store costs one replica: the same short requests through
`ferrolm serve --store sqlite:…` and `--store postgres://…`, one replica each, alternated.

Each request is a one-token chat completion from a key with an rpm and a budget, so every
request takes the whole keyed path: the key lookup, the admission (in PostgreSQL: one
transaction that locks the key's row) and the ledger row. Prints requests/s and latency
percentiles per store. Standard library only; needs Debian's PostgreSQL (as .ci/run installs)
and target/release/ferrolm.

    python3 scripts/store_bench.py --requests 300 --concurrency 4 --rounds 2
"""

import argparse
import glob
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FERROLM = os.path.join(REPO_ROOT, "target", "release", "ferrolm")
HOME = os.path.join(REPO_ROOT, "target", "ferrolm-test-home")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_pg_user(argv):
    return (["runuser", "-u", "nobody", "--"] + argv) if os.geteuid() == 0 else argv


def start_postgres(tmp):
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
    if not bins:
        raise SystemExit("no PostgreSQL under /usr/lib/postgresql: apt-get install -y postgresql")
    b = bins[-1]
    if os.geteuid() == 0:
        shutil.chown(tmp, "nobody")
    data, port = os.path.join(tmp, "data"), free_port()
    subprocess.run(as_pg_user([f"{b}/initdb", "--auth=trust", "--username=ferrolm", "--no-sync",
                               "-E", "UTF8", "-D", data]), check=True, capture_output=True)
    opts = f"-p {port} -k {tmp} -c listen_addresses=127.0.0.1"
    subprocess.run(as_pg_user([f"{b}/pg_ctl", "-w", "-D", data, "-l", os.path.join(tmp, "log"),
                               "-o", opts, "start"]), check=True, capture_output=True)
    stop = as_pg_user([f"{b}/pg_ctl", "-w", "-m", "fast", "-D", data, "stop"])
    return f"postgres://ferrolm@127.0.0.1:{port}/postgres", stop


def ferrolm(*args, **kw):
    env = dict(os.environ, FERROLM_HOME=HOME)
    return subprocess.run([FERROLM, *args], env=env, check=True, capture_output=True, **kw)


def serve(store, data_dir):
    port = free_port()
    env = dict(os.environ, FERROLM_HOME=HOME)
    p = subprocess.Popen([FERROLM, "serve", "--threads", "2", "--port", str(port), "--store", store,
                          "--data-dir", data_dir, "--max-queue", "256"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while True:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return p, port
        except OSError:
            pass
        if time.time() - t0 > 120 or p.poll() is not None:
            raise SystemExit(f"ferrolm serve --store {store} did not start")
        time.sleep(0.1)


def load(port, key, n, concurrency):
    body = json.dumps({"messages": [{"role": "user", "content": "Name a colour."}],
                       "max_tokens": 1, "temperature": 0})
    lat, errors, lock, next_i = [], [], threading.Lock(), [0]

    def worker():
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while True:
            with lock:
                if next_i[0] >= n:
                    return
                next_i[0] += 1
            t = time.perf_counter()
            c.request("POST", "/v1/chat/completions", body,
                      {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
            r = c.getresponse()
            r.read()
            with lock:
                lat.append(time.perf_counter() - t)
                if r.status != 200:
                    errors.append(r.status)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    return {"rps": n / wall, "p50_ms": 1e3 * lat[len(lat) // 2],
            "p99_ms": 1e3 * lat[min(len(lat) - 1, int(len(lat) * 0.99))], "errors": len(errors)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        pg_url, stop_pg = start_postgres(tmp)
        try:
            results = {"sqlite": [], "postgres": []}
            for r in range(a.rounds):
                for name in ("sqlite", "postgres") if r % 2 == 0 else ("postgres", "sqlite"):
                    data_dir = tempfile.mkdtemp(dir=tmp)
                    store = pg_url if name == "postgres" else f"sqlite:{data_dir}/ferrolm.db"
                    key_name = f"bench{r}"
                    out = ferrolm("keys", "create", "--json", "--name", key_name, "--rpm", "1000000",
                                  "--budget-usd", "1000", "--store", store)
                    key = json.loads(out.stdout)["secret"]
                    p, port = serve(store, data_dir)
                    try:
                        load(port, key, 20, a.concurrency)  # warm-up
                        res = load(port, key, a.requests, a.concurrency)
                    finally:
                        p.terminate()
                        p.wait()
                    results[name].append(res)
                    print(name, r, json.dumps(res), flush=True)
            for name, rs in results.items():
                print(f"{name}: {statistics.median(x['rps'] for x in rs):.1f} req/s, "
                      f"p50 {statistics.median(x['p50_ms'] for x in rs):.1f} ms, "
                      f"p99 {statistics.median(x['p99_ms'] for x in rs):.1f} ms, "
                      f"errors {sum(x['errors'] for x in rs)}")
        finally:
            subprocess.run(stop_pg, capture_output=True)


if __name__ == "__main__":
    main()
