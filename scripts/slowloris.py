#!/usr/bin/env python3
"""Slowloris check for a running `ferrolm serve` (issue 12): opens 500 idle connections and 500
that send half a request head, checks that /health still answers, and reports when the server
closed each (seconds after it was opened). Usage: scripts/slowloris.py PORT"""
import socket, sys, time, select, urllib.request
host, port = "127.0.0.1", int(sys.argv[1])
conns = []
t0 = time.time()
for i in range(500):
    conns.append(("idle", socket.create_connection((host, port)), time.time()))
for i in range(500):
    s = socket.create_connection((host, port))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    conns.append(("half", s, time.time()))
opened = time.time() - t0
# While they are held, the server still answers.
t1 = time.time()
urllib.request.urlopen(f"http://{host}:{port}/health", timeout=30).read()
health = time.time() - t1
closed = {}
live = {s.fileno(): (k, s, t) for k, s, t in conns}
while live and time.time() - t0 < 70:
    r, _, _ = select.select(list(live), [], [], 1.0)
    for fd in r:
        k, s, t = live[fd]
        try:
            d = s.recv(4096)
        except OSError:
            d = b""
        if not d:
            closed.setdefault(k, []).append(time.time() - t)
            del live[fd]
for k in ("idle", "half"):
    ts = sorted(closed.get(k, []))
    print(f"{k}: {len(ts)}/500 closed, after {ts[0]:.1f} to {ts[-1]:.1f} s open" if ts else f"{k}: none closed")
print(f"still open after {time.time()-t0:.0f} s: {len(live)}; opening took {opened:.2f} s; /health while held: {health*1000:.0f} ms")
