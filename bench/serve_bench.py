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

--max-concurrency takes a list (1,4,16): the servers stay up and every level runs on every
target; --rounds N repeats each level N times with the targets' order alternating (A B, B A, ...)
so that a noisy machine hurts both alike; the summary gives per-target medians over the rounds,
the ratio of each target to the first one, and each target's scaling over its lowest level.
Every request asks for exactly its output length (ignore_eos); requests that came back with a
different number of tokens are counted as length_mismatch, since they would skew the comparison.

Example:
  bench/serve_bench.py --tessera build/tessera ../shared/models/stories260K-hf \\
      --num-prompts 200 --request-rate 50 --input-len 64 --output-len 64 --max-concurrency 32
  bench/serve_bench.py --tessera build/tessera MODEL_DIR --llama-server llama-server MODEL.gguf \\
      --llama-args "-t 2 -np 16 -c 8192" --max-concurrency 1,4,16 --num-prompts 4,8,32 \\
      --input-len 64:128 --output-len 64 --rounds 2 --markdown
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
                        out=out_tokens, want=max_tokens, inp=usage.prompt_tokens if usage else 0))
    except Exception as e:  # a failed request is counted, never fatal
        rec.append(dict(ok=False, error=f"{type(e).__name__}: {e}"))


async def run_target(target, work, args, concurrency):
    import openai
    # One connection per request, none kept alive: a server closing an idle keep-alive
    # connection just as the client reuses it (llama-server's HTTP library does) otherwise shows
    # up as a failed request that is the client's doing.
    try:
        import httpx2 as hx
    except ImportError:
        import httpx as hx
    http = openai.DefaultAsyncHttpxClient(
        limits=hx.Limits(max_connections=None, max_keepalive_connections=0), timeout=args.timeout)
    client = openai.AsyncOpenAI(base_url=target.url + "/v1", api_key=args.api_key or "none",
                                max_retries=0, timeout=args.timeout, http_client=http)
    rng = random.Random(args.seed + 1)
    sem = asyncio.Semaphore(concurrency) if concurrency else None
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
             output_tokens=out_tok, length_mismatch=sum(r["out"] != r["want"] for r in ok))
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
    keys = [k for k in results[names[0]] if k not in ("first_error", "loadavg")]
    width = max(len(k) for k in keys) + 2
    colw = max(16, max(len(n) for n in names) + 2)
    print("".join([f"{'':<{width}}"] + [f"{n:>{colw}}" for n in names]))
    for k in keys:
        row = [f"{k:<{width}}"]
        for n in names:
            v = results[n].get(k, float("nan"))
            row.append(f"{v:>{colw}.2f}" if isinstance(v, float) else f"{v:>{colw}}")
        print("".join(row))
    for n in names:
        if "first_error" in results[n]:
            print(f"{n}: first error: {results[n]['first_error']}")


SUMMARY_KEYS = ("output_throughput", "request_throughput", "median_ttft_ms", "p99_ttft_ms",
                "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "p99_itl_ms")


def summarize_sweep(runs, names, levels):
    """Median over rounds of each key, per (target, level); ratios to the first target and scaling
    of output tokens/s over each target's lowest level."""
    med = {}
    for n in names:
        for c in levels:
            rs = [r["result"] for r in runs if r["target"] == n and r["concurrency"] == c]
            med[n, c] = {k: statistics.median(r[k] for r in rs) for k in SUMMARY_KEYS}
    return med


def print_sweep(runs, names, levels, markdown):
    med = summarize_sweep(runs, names, levels)
    base = names[0]
    if markdown:
        print("| concurrency | target | output tok/s | req/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms "
              "| ITL p50 / p99 ms | tok/s vs " + base + " | tok/s vs own c=" + str(levels[0]) + " |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    else:
        print(f"{'conc':>5} {'target':<16} {'out tok/s':>10} {'req/s':>7} {'TTFT p50/p99':>17} "
              f"{'TPOT p50/p99':>15} {'ITL p50/p99':>15} {'vs ' + base:>14} {'scaling':>8}")
    for c in levels:
        for n in names:
            m = med[n, c]
            ratio = m["output_throughput"] / med[base, c]["output_throughput"]
            scale = m["output_throughput"] / med[n, levels[0]]["output_throughput"]
            ttft = f"{m['median_ttft_ms']:.0f} / {m['p99_ttft_ms']:.0f}"
            tpot = f"{m['median_tpot_ms']:.0f} / {m['p99_tpot_ms']:.0f}"
            itl = f"{m['median_itl_ms']:.0f} / {m['p99_itl_ms']:.0f}"
            if markdown:
                print(f"| {c} | {n} | {m['output_throughput']:.2f} | {m['request_throughput']:.3f} "
                      f"| {ttft} | {tpot} | {itl} | {ratio:.2f}x | {scale:.2f}x |")
            else:
                print(f"{c:>5} {n:<16} {m['output_throughput']:>10.2f} "
                      f"{m['request_throughput']:>7.3f} {ttft:>17} {tpot:>15} {itl:>15} "
                      f"{ratio:>13.2f}x {scale:>7.2f}x")
    bad = [r for r in runs if r["result"]["failed"] or r["result"]["length_mismatch"]]
    for r in bad:
        print(f"warning: {r['target']} at concurrency {r['concurrency']} round {r['round']}: "
              f"{r['result']['failed']} failed, {r['result']['length_mismatch']} requests with "
              f"another output length than asked; first error: "
              f"{r['result'].get('first_error', '-')}")


def int_list(spec):
    return [int(x) for x in str(spec).split(",") if x != ""]


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
    ap.add_argument("--num-prompts", default="100",
                    help="N, or one N per --max-concurrency level (4,8,32)")
    ap.add_argument("--request-rate", type=float, default=float("inf"),
                    help="Poisson arrival rate in requests/s (inf: all at once)")
    ap.add_argument("--max-concurrency", default="0",
                    help="0: unlimited; a list (1,4,16) runs each level in turn")
    ap.add_argument("--rounds", type=int, default=1,
                    help="runs of each level per target, the targets' order alternating")
    ap.add_argument("--input-len", default="64", help="N, LO:HI (uniform) or nMEAN,SD (normal)")
    ap.add_argument("--output-len", default="64", help="N, LO:HI (uniform) or nMEAN,SD (normal)")
    ap.add_argument("--percentiles", default="50,90,99")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--no-warmup", dest="warmup", action="store_false")
    ap.add_argument("--startup-timeout", type=float, default=300)
    ap.add_argument("--json-out", help="write the results here as JSON")
    ap.add_argument("--markdown", action="store_true", help="print the summary as a Markdown table")
    ap.add_argument("--verbose", action="store_true", help="show the servers' logs")
    args = ap.parse_args()
    args.percentiles = sorted(set([float(p) for p in args.percentiles.split(",") if p] + [50, 99]))
    levels = int_list(args.max_concurrency) or [0]
    prompts = int_list(args.num_prompts)
    if len(prompts) == 1:
        prompts = prompts * len(levels)
    if len(prompts) != len(levels):
        ap.error("--num-prompts needs one value or one per --max-concurrency level")
    targets = start_targets(args)
    if not targets:
        ap.error("give at least one target (--tessera, --llama-server or --url)")
    names = []
    for t in targets:
        t.label = t.name if t.name not in names else f"{t.name}#{len(names)}"
        names.append(t.label)
    runs = []
    try:
        for t in targets:
            wait_healthy(t.url, t.proc, args.startup_timeout)
            if t.model is None:
                with urllib.request.urlopen(t.url + "/v1/models") as r:
                    t.model = json.load(r)["data"][0]["id"]
        for c, n_prompts in zip(levels, prompts):
            args.num_prompts = n_prompts
            work = make_workload(args)  # the same requests for every target and round
            for rnd in range(args.rounds):
                order = targets if rnd % 2 == 0 else targets[::-1]
                for t in order:
                    load0 = os.getloadavg()[0]
                    print(f"== {t.label} at {t.url}: concurrency {c or 'unlimited'}, "
                          f"{n_prompts} prompts, round {rnd + 1}/{args.rounds}, "
                          f"load {load0:.2f}", file=sys.stderr)
                    res = asyncio.run(run_target(t, work, args, c))
                    res["loadavg"] = [load0, os.getloadavg()[0]]
                    print(f"   {res['output_throughput']:.2f} output tok/s, "
                          f"{res['failed']} failed, {res['length_mismatch']} length mismatches",
                          file=sys.stderr)
                    runs.append(dict(target=t.label, concurrency=c, round=rnd + 1,
                                     num_prompts=n_prompts, result=res))
    finally:
        for t in targets:
            t.stop()
    if len(levels) == 1 and args.rounds == 1:
        print_table({r["target"]: r["result"] for r in runs})
    else:
        print_sweep(runs, names, levels, args.markdown)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(dict(config=vars(args), runs=runs), f, indent=2, default=str)
    return 0 if all(r["result"]["failed"] == 0 and r["result"]["length_mismatch"] == 0
                    for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
