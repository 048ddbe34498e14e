#!/usr/bin/env python3
"""Serving benchmark in the manner of `vllm bench serve`: random prompts with chosen input/output
length distributions, sent as a Poisson process (or all at once) under an optional concurrency
cap, streamed through /v1/completions; reports request throughput, output tokens/s and
TTFT / TPOT / ITL / E2E percentiles. Several targets run one after another on the same workload
in one invocation, so tessera and llama.cpp's llama-server can be compared side by side.

Targets (repeatable, any mix):
  --tessera BIN MODEL           start `BIN serve MODEL` on a free port (extra flags: --tessera-args)
  --llama-server BIN MODEL.gguf start llama.cpp's server on a free port (extra: --llama-args)
  --url NAME=http://host:port   an already running OpenAI-compatible server

Example:
  bench/serve_bench.py --tessera build/tessera ../shared/models/stories260K-hf \\
      --num-prompts 200 --request-rate 50 --input-len 64 --output-len 64 --max-concurrency 32
"""
import argparse
import asyncio
import json
import math
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at "
         "which but have an they you were her she there one all we can has been if more when will "
         "would who so no once upon time little girl boy dog cat tree sun happy play ball").split()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url, proc, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not healthy after {timeout}s")


class Target:
    def __init__(self, name, url, proc=None, model=None):
        self.name, self.url, self.proc, self.model = name, url, proc, model

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_targets(args):
    targets = []
    for binary, model in args.tessera or []:
        port = free_port()
        cmd = [binary, "serve", model, "--host", "127.0.0.1", "--port", str(port),
               "--served-model-name", "bench", *shlex.split(args.tessera_args)]
        proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL if not args.verbose else None)
        targets.append(Target("tessera", f"http://127.0.0.1:{port}", proc, "bench"))
    for binary, model in args.llama_server or []:
        port = free_port()
        cmd = [binary, "-m", model, "--host", "127.0.0.1", "--port", str(port), "--alias",
               "bench", *shlex.split(args.llama_args)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL if not args.verbose else None)
        targets.append(Target("llama-server", f"http://127.0.0.1:{port}", proc, "bench"))
    for spec in args.url or []:
        name, _, url = spec.partition("=")
        targets.append(Target(name, url.rstrip("/"), None, args.model))
    return targets


def draw_len(rng, spec):
    """'64' -> 64; '32:128' -> uniform in [32, 128]; 'n64,16' -> normal(64, 16) clipped >= 1."""
    if ":" in spec:
        lo, hi = (int(x) for x in spec.split(":"))
        return rng.randint(lo, hi)
    if spec.startswith("n"):
        mu, sd = (float(x) for x in spec[1:].split(","))
        return max(1, int(round(rng.gauss(mu, sd))))
    return int(spec)


def make_workload(args):
    rng = random.Random(args.seed)
    work = []
    for _ in range(args.num_prompts):
        n_in, n_out = draw_len(rng, args.input_len), draw_len(rng, args.output_len)
        # Roughly one token per word for small vocabularies; the server reports the true count.
        prompt = " ".join(rng.choice(WORDS) for _ in range(n_in))
        work.append((prompt, n_out))
    return work


async def one_request(client, model, prompt, max_tokens, rec):
    t0 = time.perf_counter()
    first, last, gaps, n_chunks, usage = None, None, [], 0, None
    try:
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage:
                usage = chunk.usage
            if chunk.choices and chunk.choices[0].text:
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
                n_chunks += 1
        end = time.perf_counter()
        out_tokens = usage.completion_tokens if usage else n_chunks
        rec.append(dict(ok=True, ttft=(first or end) - t0, e2e=end - t0, itl=gaps,
                        out=out_tokens, inp=usage.prompt_tokens if usage else 0))
    except Exception as e:  # a failed request is counted, never fatal
        rec.append(dict(ok=False, error=f"{type(e).__name__}: {e}"))


async def run_target(target, work, args):
    import openai
    client = openai.AsyncOpenAI(base_url=target.url + "/v1", api_key=args.api_key or "none",
                                max_retries=0, timeout=args.timeout)
    rng = random.Random(args.seed + 1)
    sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    rec, tasks = [], []

    async def limited(prompt, n_out):
        if sem is None:
            return await one_request(client, target.model, prompt, n_out, rec)
        async with sem:
            return await one_request(client, target.model, prompt, n_out, rec)

    if args.warmup:
        await one_request(client, target.model, work[0][0], 4, [])
    t0 = time.perf_counter()
    for prompt, n_out in work:
        tasks.append(asyncio.create_task(limited(prompt, n_out)))
        if math.isfinite(args.request_rate):
            await asyncio.sleep(rng.expovariate(args.request_rate))
    await asyncio.gather(*tasks)
    duration = time.perf_counter() - t0
    await client.close()
    return summarize(rec, duration, args.percentiles)


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(rec, duration, percentiles):
    ok = [r for r in rec if r["ok"]]
    out_tok = sum(r["out"] for r in ok)
    in_tok = sum(r["inp"] for r in ok)
    tpot = [(r["e2e"] - r["ttft"]) / (r["out"] - 1) for r in ok if r["out"] > 1]
    itl = [g for r in ok for g in r["itl"]]
    s = dict(completed=len(ok), failed=len(rec) - len(ok), duration_s=duration,
             request_throughput=len(ok) / duration, output_throughput=out_tok / duration,
             total_token_throughput=(in_tok + out_tok) / duration, input_tokens=in_tok,
             output_tokens=out_tok)
    for name, xs in (("ttft_ms", [r["ttft"] for r in ok]), ("tpot_ms", tpot), ("itl_ms", itl),
                     ("e2e_ms", [r["e2e"] for r in ok])):
        s[f"mean_{name}"] = statistics.fmean(xs) * 1e3 if xs else float("nan")
        s[f"median_{name}"] = pct(xs, 50) * 1e3
        for p in percentiles:
            s[f"p{p:g}_{name}"] = pct(xs, p) * 1e3
    errors = [r["error"] for r in rec if not r["ok"]]
    if errors:
        s["first_error"] = errors[0]
    return s


def print_table(results):
    names = list(results)
    keys = [k for k in results[names[0]] if k != "first_error"]
    width = max(len(k) for k in keys) + 2
    print("".join([f"{'':<{width}}"] + [f"{n:>16}" for n in names]))
    for k in keys:
        row = [f"{k:<{width}}"]
        for n in names:
            v = results[n].get(k, float("nan"))
            row.append(f"{v:>16.2f}" if isinstance(v, float) else f"{v:>16}")
        print("".join(row))
    for n in names:
        if "first_error" in results[n]:
            print(f"{n}: first error: {results[n]['first_error']}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--tessera", nargs=2, action="append", metavar=("BIN", "MODEL"))
    ap.add_argument("--tessera-args", default="", help="extra flags for tessera serve")
    ap.add_argument("--llama-server", nargs=2, action="append", metavar=("BIN", "GGUF"))
    ap.add_argument("--llama-args", default="", help="extra flags for llama-server")
    ap.add_argument("--url", action="append", help="NAME=URL of a running server")
    ap.add_argument("--model", default=None, help="model name for --url targets")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--num-prompts", type=int, default=100)
    ap.add_argument("--request-rate", type=float, default=float("inf"),
                    help="Poisson arrival rate in requests/s (inf: all at once)")
    ap.add_argument("--max-concurrency", type=int, default=0, help="0: unlimited")
    ap.add_argument("--input-len", default="64", help="N, LO:HI (uniform) or nMEAN,SD (normal)")
    ap.add_argument("--output-len", default="64", help="N, LO:HI (uniform) or nMEAN,SD (normal)")
    ap.add_argument("--percentiles", default="50,90,99")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--no-warmup", dest="warmup", action="store_false")
    ap.add_argument("--startup-timeout", type=float, default=300)
    ap.add_argument("--json-out", help="write the results here as JSON")
    ap.add_argument("--verbose", action="store_true", help="show the servers' logs")
    args = ap.parse_args()
    args.percentiles = [float(p) for p in args.percentiles.split(",") if p]
    targets = start_targets(args)
    if not targets:
        ap.error("give at least one target (--tessera, --llama-server or --url)")
    work = make_workload(args)
    results = {}
    try:
        for t in targets:
            wait_healthy(t.url, t.proc, args.startup_timeout)
            if t.model is None:
                with urllib.request.urlopen(t.url + "/v1/models") as r:
                    t.model = json.load(r)["data"][0]["id"]
            label = t.name if t.name not in results else f"{t.name}#{len(results)}"
            print(f"== {label} at {t.url}", file=sys.stderr)
            results[label] = asyncio.run(run_target(t, work, args))
            t.stop()
    finally:
        for t in targets:
            t.stop()
    print_table(results)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(dict(config=vars(args), results=results), f, indent=2, default=str)
    return 0 if all(r["failed"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
