#!/usr/bin/env python3
"""Decode speed of the distributed layouts: for each layout, start `tessera serve` (uni for T=1,
mp worker processes otherwise), stream one greedy completion of --tokens tokens (ignore_eos) per
run and time the tokens after the first (so prefill is left out); with --concurrency N, N streams
at once and their aggregate rate. Prints one table row per
layout: median decode tokens/s and ms/token over --runs runs, plus the run-to-run spread.

Example:
  bench/dist_bench.py build-dist/tessera ../shared/models/stories260K-hf --tokens 200
  bench/dist_bench.py build-dist/tessera /path/qwen3-0.6b --layouts uni,tp2,pp2,mp1 --tokens 32
Layouts: uni (one process), mp1 (one worker process: the process overhead alone), tp2, pp2,
tp2pp2.
"""
import argparse
import http.client
import json
import re
import statistics
import subprocess
import sys
import threading
import time

LAYOUTS = {
    "uni": [],
    "mp1": ["--distributed-executor-backend", "mp"],
    "tp2": ["--tensor-parallel-size", "2"],
    "pp2": ["--pipeline-parallel-size", "2"],
    "tp2pp2": ["--tensor-parallel-size", "2", "--pipeline-parallel-size", "2"],
}


def start(exe, model, args, extra):
    p = subprocess.Popen([exe, "serve", model, "--host", "127.0.0.1", "--port", "0",
                          "--served-model-name", "m", *args, *extra], stderr=subprocess.PIPE,
                         text=True)
    port = None
    deadline = time.time() + 600
    while time.time() < deadline:
        line = p.stderr.readline()
        if not line:
            break
        m = re.search(r"on http://[^:]+:(\d+)", line)
        if m:
            port = int(m.group(1))
            break
    if port is None:
        p.kill()
        sys.exit("server did not start: " + " ".join(args))
    threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
    return p, port


def one_run(port, tokens, concurrency=1):
    if concurrency > 1:
        # Aggregate decode rate of several streams at once (what pipeline micro-batches serve).
        out = []
        t0 = time.perf_counter()
        ths = [threading.Thread(target=lambda: out.append(one_run(port, tokens)))
               for _ in range(concurrency)]
        for t in ths:
            t.start()
        for t in ths:
            t.join()
        return concurrency * tokens / (time.perf_counter() - t0)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    conn.request("POST", "/v1/completions", body=json.dumps({
        "model": "m", "prompt": "Once upon a time", "max_tokens": tokens, "temperature": 0,
        "ignore_eos": True, "stream": True}), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    stamps = []
    while True:
        line = r.readline()
        if not line:
            break
        line = line.decode().strip()
        if line == "data: [DONE]":
            break
        if line.startswith("data: "):
            stamps.append(time.perf_counter())
    conn.close()
    # The last chunk may carry only the finish reason; the first is the prefill.
    if len(stamps) < 3:
        sys.exit("too few chunks streamed")
    return (len(stamps) - 2) / (stamps[-2] - stamps[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("exe")
    ap.add_argument("model")
    ap.add_argument("--layouts", default="uni,mp1,tp2,pp2")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=1,
                    help="streams at once; > 1 reports aggregate tokens/s including prefill")
    ap.add_argument("--serve-args", default="", help="extra flags for every server")
    a = ap.parse_args()
    print(f"| layout | decode tok/s (median of {a.runs}) | ms/token | min-max tok/s |")
    print("| --- | ---: | ---: | ---: |")
    for name in a.layouts.split(","):
        p, port = start(a.exe, a.model, LAYOUTS[name], a.serve_args.split())
        try:
            one_run(port, 4)  # warm-up: page the weights in
            rates = [one_run(port, a.tokens, a.concurrency) for _ in range(a.runs)]
        finally:
            p.terminate()
            p.wait(60)
        med = statistics.median(rates)
        print(f"| {name} | {med:.1f} | {1000 / med:.2f} | {min(rates):.1f}-{max(rates):.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
