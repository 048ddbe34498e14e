#!/usr/bin/env python3
"""tessera vs llama.cpp on the CPU, side by side on the same GGUF bytes.

  bench/cpu_bench.py LLAMA_BIN_DIR [--tessera build/tessera] [--models-dir DIR]
                     [--models qwen3-0.6b,llama-3.2-1b] [--types bf16,q8_0,q4_0] [--threads 2]

LLAMA_BIN_DIR is a llama.cpp build made by hand outside this repository (it must hold
llama-bench). Random weights come from tools/gen_checkpoint.py at the published shapes and are
written once as GGUF into --models-dir. For each model and weight type the two engines run
alternately in one run (tessera, llama.cpp, tessera, ...), on the same thread count:
prefill of --prompt tokens, decode of --gen tokens at batch 1, and tessera's decode at batch
--batch (total tokens/s; llama-batched-bench is used for llama.cpp when the build has it).
With --bf16-act, BF16 weights on CPUs with AVX512-BF16 also run tessera's --bf16-act mode
(activations rounded to BF16, llama.cpp's arithmetic); its default keeps float32 activations.
Prints each figure, the ratio tessera / llama.cpp, the memory read bandwidth (from `tessera bench
--membw`, measured again for every model and type, between its rounds) and the decode roofline:
bytes of weights read per token / that bandwidth.
The machine may be shared: only same-run ratios mean anything; the load average is printed.
"""
import argparse
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))


def model_path(models_dir, preset, qtype):
    return pathlib.Path(models_dir) / f"{preset}-{qtype}.gguf"


def ensure_model(models_dir, preset, qtype):
    path = model_path(models_dir, preset, qtype)
    if path.exists():
        return path
    import gen_checkpoint as gc  # numpy + gguf from the test venv

    p = gc.PRESETS[preset]
    tok_dir = pathlib.Path(gc.default_tokenizers()) / p["family"]
    tensors = ((n, gc.make_tensor(0, n, s, k)) for n, s, k in gc.tensor_specs(p))
    tmp = path.with_suffix(".tmp")
    print(f"# writing {path} (random weights, {qtype}) ...", flush=True)
    gc.write_gguf(tmp, p, preset, tensors, "bf16", tok_dir,
                  None if qtype == "bf16" else qtype)
    tmp.rename(path)
    return path


def gguf_weight_bytes(path):
    """Bytes of the weights one decode step reads: every 2-D tensor once (the tied embedding
    counts once, as the output projection; the embedding lookup reads one row)."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    total = 0
    for t in r.tensors:
        if len(t.shape) >= 2:
            total += int(t.n_bytes)
    return total


def run_json(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return [json.loads(l) for l in out.splitlines() if l.startswith("{")]


def tessera_run(exe, model, threads, prompt, gen, batch, extra=()):
    cmd = [exe, "bench", str(model), "--prompt-tokens", str(prompt), "--gen-tokens", str(gen),
           "--batch", str(batch), "--threads", str(threads), "--json", *extra]
    return run_json(cmd)[-1]


def bf16_act_supported(exe):
    """Whether `tessera bench --bf16-act` runs here (AVX512-BF16)."""
    flags = open("/proc/cpuinfo").read()
    return " avx512_bf16" in flags


def llama_run(bin_dir, model, threads, prompt, gen):
    cmd = [str(pathlib.Path(bin_dir) / "llama-bench"), "-m", str(model), "-p", str(prompt),
           "-n", str(gen), "-t", str(threads), "-r", "1", "-o", "jsonl"]
    try:
        rows = run_json(cmd)
    except subprocess.CalledProcessError as e:
        return {"error": f"llama-bench exited with {e.returncode}"}
    res = {}
    for r in rows:
        if r.get("n_prompt") and not r.get("n_gen"):
            res["prefill_tok_s"] = r["avg_ts"]
        elif r.get("n_gen") and not r.get("n_prompt"):
            res["decode_tok_s"] = r["avg_ts"]
    return res


def llama_batched(bin_dir, model, threads, prompt, gen, batch):
    exe = pathlib.Path(bin_dir) / "llama-batched-bench"
    if not exe.exists():
        return None
    cmd = [str(exe), "-m", str(model), "-t", str(threads), "-npp", str(prompt), "-ntg", str(gen),
           "-npl", str(batch), "-c", str(batch * (prompt + gen) + 64), "--output-format", "jsonl"]
    try:
        rows = run_json(cmd)
    except subprocess.CalledProcessError:
        return None
    return rows[-1].get("speed_tg") if rows else None


def fmt(x):
    return "n/a" if x is None else f"{x:8.1f}"


def ratio(a, b):
    return "n/a" if not a or not b else f"{a / b:5.2f}x"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("llama_bin_dir")
    ap.add_argument("--tessera", default=str(ROOT / "build" / "tessera"))
    ap.add_argument("--models-dir", default=str(ROOT / "build-bench-models"))
    ap.add_argument("--models", default="qwen3-0.6b,llama-3.2-1b")
    ap.add_argument("--types", default="bf16,q8_0,q4_0")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batch-prompt", type=int, default=64,
                    help="prompt tokens per sequence before the batched decode")
    ap.add_argument("--batch-gen", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2, help="alternating rounds (median reported)")
    ap.add_argument("--bf16-act", action="store_true",
                    help="also run tessera --bf16-act for BF16 weights (AVX512-BF16 CPUs)")
    a = ap.parse_args()
    os.makedirs(a.models_dir, exist_ok=True)

    def membw():
        out = subprocess.run([a.tessera, "bench", "--membw", "--threads", str(a.threads),
                              "--json"], check=True, capture_output=True, text=True).stdout
        return json.loads(out.splitlines()[-1])["read_gb_s"]

    bw = membw()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                if l.startswith("model name")), "?")
    print(f"# cpu: {cpu}; threads {a.threads}; load average {os.getloadavg()[0]:.2f}")
    print(f"# memory read bandwidth: {bw:.1f} GB/s")
    hdr = ("model", "type", "figure", "tessera", "llama.cpp", "ratio")
    print(f"{hdr[0]:14} {hdr[1]:5} {hdr[2]:22} {hdr[3]:>8} {hdr[4]:>9} {hdr[5]:>7}")
    results = []
    for preset in a.models.split(","):
        for qtype in a.types.split(","):
            path = ensure_model(a.models_dir, preset, qtype)
            wbytes = gguf_weight_bytes(path)
            ts_p, ts_d, ll_p, ll_d, ts_b = [], [], [], [], []
            # tessera with llama.cpp's arithmetic for BF16 weights (activations rounded to BF16)
            fast = a.bf16_act and qtype == "bf16" and bf16_act_supported(a.tessera)
            fa_p, fa_d, fa_b = [], [], []
            llama_err = None
            bws, loads = [], [os.getloadavg()[0]]
            for _ in range(a.reps):  # alternate the engines so load changes hit both
                bws.append(membw())
                t = tessera_run(a.tessera, path, a.threads, a.prompt, a.gen, 1)
                ts_p.append(t["prefill_tok_s"])
                ts_d.append(t["decode_tok_s"])
                ll = llama_run(a.llama_bin_dir, path, a.threads, a.prompt, a.gen)
                if "error" in ll:
                    llama_err = ll["error"]
                else:
                    ll_p.append(ll.get("prefill_tok_s"))
                    ll_d.append(ll.get("decode_tok_s"))
                tb = tessera_run(a.tessera, path, a.threads, a.batch_prompt, a.batch_gen, a.batch)
                ts_b.append(tb["decode_tok_s"])
                if fast:
                    f = tessera_run(a.tessera, path, a.threads, a.prompt, a.gen, 1, ["--bf16-act"])
                    fa_p.append(f["prefill_tok_s"])
                    fa_d.append(f["decode_tok_s"])
                    fb = tessera_run(a.tessera, path, a.threads, a.batch_prompt, a.batch_gen,
                                     a.batch, ["--bf16-act"])
                    fa_b.append(fb["decode_tok_s"])
            med = lambda v: statistics.median(v) if v and None not in v else None
            llb = llama_batched(a.llama_bin_dir, path, a.threads, a.batch_prompt, a.batch_gen,
                                a.batch)
            bws.append(membw())
            loads.append(os.getloadavg()[0])
            bw = statistics.median(bws)
            roof = bw * 1e9 / wbytes
            r = dict(model=preset, type=qtype, weight_bytes=wbytes, roofline_tok_s=roof,
                     tessera_prefill=med(ts_p), tessera_decode=med(ts_d),
                     llama_prefill=med(ll_p), llama_decode=med(ll_d),
                     tessera_batch_decode=med(ts_b), llama_batch_decode=llb,
                     llama_error=llama_err, load=os.getloadavg()[0], read_gb_s=bws,
                     load_range=[min(loads), max(loads)])
            if fast:
                r.update(tessera_bf16act_prefill=med(fa_p), tessera_bf16act_decode=med(fa_d),
                         tessera_bf16act_batch_decode=med(fa_b))
            results.append(r)
            rows = [(f"prefill {a.prompt} tok/s", r["tessera_prefill"], r["llama_prefill"]),
                    (f"decode b1 tok/s", r["tessera_decode"], r["llama_decode"]),
                    (f"decode b{a.batch} tok/s", r["tessera_batch_decode"], llb)]
            if fast:
                rows += [(f"prefill {a.prompt} bf16-act", r["tessera_bf16act_prefill"],
                          r["llama_prefill"]),
                         ("decode b1 bf16-act", r["tessera_bf16act_decode"], r["llama_decode"]),
                         (f"decode b{a.batch} bf16-act", r["tessera_bf16act_batch_decode"], llb)]
            for name, x, y in rows:
                print(f"{preset:14} {qtype:5} {name:22} {fmt(x)} {fmt(y):>9} {ratio(x, y):>7}")
            b1 = r["tessera_decode"]
            print(f"{preset:14} {qtype:5} {'decode roofline':22} {fmt(roof)}   "
                  f"(tessera b1 at {100 * b1 / roof:.0f}%; {wbytes / 1e6:.0f} MB of weights; "
                  f"read bandwidth {bw:.1f} GB/s, median of "
                  f"{' '.join(f'{x:.1f}' for x in bws)}; "
                  f"batch {a.batch} = {r['tessera_batch_decode'] / b1:.1f}x b1; "
                  f"load {min(loads):.1f}-{max(loads):.1f})"
                  + (f"; llama.cpp: {llama_err}" if llama_err else ""), flush=True)
    print("# json " + json.dumps(dict(cpu=cpu, threads=a.threads, read_gb_s=bw, results=results)))


if __name__ == "__main__":
    main()
