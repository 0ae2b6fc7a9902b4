#!/usr/bin/env python3
"""Load test of an OpenAI-compatible server (lmforge serve, llama.cpp's server, vLLM) on loopback.

Standard library only. Sends the same streamed completion requests one after another
(sequential), then from N concurrent clients, and prints per-request latency (p50/p99), time to
first token and total generated tokens/s for both, as one JSON line each and a table.

  python3 scripts/load_test.py --url http://127.0.0.1:8000 --model NAME \
      --clients 8 --requests 32 --max-tokens 64 [--ban-token EOS_ID ...]

--ban-token (repeatable) sends logit_bias {ID: -100} so that every answer runs to --max-tokens (equal work
per request whatever the model says). Every request must complete (HTTP 200, a finish reason,
[DONE]); the script exits non-zero otherwise.
"""
import argparse
import http.client
import json
import statistics
import sys
import threading
import time
import urllib.parse

PROMPTS = [
    "The history of the printing press begins",
    "Write a short poem about the sea.",
    "Explain why the sky is blue in one paragraph.",
    "List three uses of a paperclip:",
    "Once upon a time, in a village by the river,",
    "The main difference between a list and a tuple is",
    "A good breakfast should include",
    "To be, or not to be,",
]


def one(url, model, prompt, max_tokens, ban, timeout):
    """One streamed request: (latency_s, ttft_s, completion_tokens)."""
    u = urllib.parse.urlparse(url)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.7,
            "stream": True, "stream_options": {"include_usage": True}}
    if ban:
        body["logit_bias"] = {str(t): -100 for t in ban}
    t0 = time.perf_counter()
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
    ttft, tokens, finish, done = None, None, None, False
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            done = True
            break
        ev = json.loads(data)
        if "error" in ev:
            raise RuntimeError(ev["error"]["message"])
        for ch in ev.get("choices", []):
            if ch.get("text") and ttft is None:
                ttft = time.perf_counter() - t0
            finish = ch.get("finish_reason") or finish
        if ev.get("usage"):
            tokens = ev["usage"]["completion_tokens"]
    c.close()
    if not done or finish is None or tokens is None:
        raise RuntimeError(f"incomplete stream (done={done}, finish={finish}, usage={tokens})")
    return time.perf_counter() - t0, ttft if ttft is not None else float("nan"), tokens


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * len(xs) + 0.5) - 1))]


def run(a, clients):
    results, errors, lock = [], [], threading.Lock()
    todo = list(range(a.requests))

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
            try:
                r = one(a.url, a.model, PROMPTS[i % len(PROMPTS)], a.max_tokens, a.ban_token, a.timeout)
                with lock:
                    results.append(r)
            except Exception as e:  # noqa: BLE001 (reported below)
                with lock:
                    errors.append(str(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = [r[0] for r in results]
    ttft = [r[1] for r in results]
    toks = sum(r[2] for r in results)
    return {
        "mode": "sequential" if clients == 1 else f"{clients} concurrent",
        "requests": a.requests, "completed": len(results), "errors": errors[:3],
        "wall_s": round(wall, 2), "completion_tokens": toks,
        "tokens_per_s": round(toks / wall, 1),
        "latency_p50_s": round(pct(lat, 50), 3) if lat else None,
        "latency_p99_s": round(pct(lat, 99), 3) if lat else None,
        "ttft_p50_s": round(pct(ttft, 50), 3) if ttft else None,
        "ttft_p99_s": round(pct(ttft, 99), 3) if ttft else None,
        "mean_tokens_per_request": round(toks / max(1, len(results)), 1),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", required=True)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--ban-token", type=int, action="append", default=[])
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--skip-sequential", action="store_true")
    a = p.parse_args()
    one(a.url, a.model, PROMPTS[0], 4, a.ban_token, a.timeout)  # warm-up
    rows = []
    if not a.skip_sequential:
        rows.append(run(a, 1))
        print(json.dumps(rows[-1]), flush=True)
    rows.append(run(a, a.clients))
    print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'mode':<16}{'done':>6}{'tokens/s':>10}{'p50 s':>8}{'p99 s':>8}{'ttft p50':>10}{'ttft p99':>10}")
    for r in rows:
        print(f"{r['mode']:<16}{r['completed']:>6}{r['tokens_per_s']:>10}{r['latency_p50_s']:>8}"
              f"{r['latency_p99_s']:>8}{r['ttft_p50_s']:>10}{r['ttft_p99_s']:>10}")
    if len(rows) == 2:
        print(f"throughput, concurrent / sequential: {rows[1]['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x")
    if any(r["completed"] != r["requests"] for r in rows):
        sys.exit("not every request completed: " + "; ".join(e for r in rows for e in r["errors"]))


if __name__ == "__main__":
    main()
