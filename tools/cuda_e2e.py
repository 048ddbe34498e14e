#!/usr/bin/env python3
"""End-to-end check of `tessera generate --device cuda` against Hugging Face transformers.

For each preset (the exact Qwen3-0.6B and Llama-3.2-1B shapes by default) this writes the random
bf16 checkpoint with tools/gen_checkpoint.py, then for several prompts (one long enough for the
split-KV attention path) runs tessera greedily for --steps tokens with --dump-logits, and compares
every step's logits row with transformers on the GPU:

  - teacher-forced: transformers reads the prompt plus tessera's tokens in one forward pass, in
    bf16 (the model as published) and in float32 (the same bf16 weights, upcast); the relative
    error of a row is ||tessera - hf|| / ||hf||, and a step agrees when hf's argmax is tessera's
    token (a disagreement is reported with hf's margin between its two best logits);
  - free-running: transformers' own greedy continuation (bf16, KV cache) against tessera's tokens.

Needs torch, transformers and numpy; runs where a GPU is (tools/cuda_gpu.sh drives it).
  cuda_e2e.py --tessera BIN --work DIR [--presets a,b] [--steps 64] [--graphs 1,0] [--out FILE]
"""
import argparse
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import gen_checkpoint  # noqa: E402
from golden_logits import long_text  # noqa: E402

PROMPTS = [
    "Once upon a time",
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Zürich, 東京 and São Paulo: naïve café résumé — 3.14159",
]


def _tensor(job):
    seed, name, shape, kind = job
    enc, sd = gen_checkpoint.encode(gen_checkpoint.make_tensor(seed, name, shape, kind), "bf16")
    return name, enc, sd


def write_checkpoint(preset, out, tokenizers=None, procs=16):
    """gen_checkpoint.generate(preset, out, dtype="bf16") for one shard, its tensors made in
    parallel: the same bytes in a fraction of the time."""
    import multiprocessing
    import shutil
    import json
    import struct
    p = gen_checkpoint.PRESETS[preset]
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = pathlib.Path(tokenizers or gen_checkpoint.default_tokenizers()) / p["family"]
    cfg = gen_checkpoint.hf_config(p, "bf16")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = {"bos_token_id": p["ids"]["bos"], "eos_token_id": p["ids"]["gen_eos"], "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tok_dir / f, out / f)
    jobs = [(0, n, s, k) for n, s, k in sorted(gen_checkpoint.tensor_specs(p))]
    with multiprocessing.Pool(procs) as pool:
        items = pool.map(_tensor, jobs, chunksize=1)
    header, off = {}, 0
    for name, arr, sd in items:
        header[name] = {"dtype": sd, "shape": list(arr.shape),
                        "data_offsets": [off, off + arr.nbytes]}
        off += arr.nbytes
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(out / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for _, arr, _ in items:
            f.write(np.ascontiguousarray(arr).tobytes())
    return out


def read_dump(path):
    raw = pathlib.Path(path).read_bytes()
    n_prompt, vocab = np.frombuffer(raw[:8], dtype="<i4")
    ids = np.frombuffer(raw[8:8 + 4 * n_prompt], dtype="<i4").astype(np.int64)
    rows = np.frombuffer(raw[8 + 4 * n_prompt:], dtype="<f4").reshape(-1, vocab)
    return ids, rows


def run_tessera(binary, model_dir, prompt, steps, dump, graphs):
    env = dict(os.environ, TESSERA_CUDA_GRAPHS=str(graphs))
    t0 = time.time()
    r = subprocess.run([binary, "generate", str(model_dir), "--device", "cuda", "--prompt", prompt,
                        "--max-tokens", str(steps), "--ignore-eos", "--dump-logits", str(dump)],
                       capture_output=True, text=True, env=env, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"tessera failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    ids, rows = read_dump(dump)
    return ids, rows, r.stderr, time.time() - t0


def hf_teacher(torch, model, seq, n_prompt, n_rows):
    with torch.no_grad():
        x = torch.tensor([seq], device="cuda")
        logits = model(x).logits[0].float()
    return logits[n_prompt - 1:n_prompt - 1 + n_rows].cpu().numpy()


def hf_greedy(torch, model, prompt_ids, steps):
    out = []
    with torch.no_grad():
        r = model(torch.tensor([prompt_ids], device="cuda"), use_cache=True)
        past = r.past_key_values
        nxt = int(r.logits[0, -1].float().argmax())
        for i in range(steps):
            out.append(nxt)
            if i + 1 == steps:
                break
            r = model(torch.tensor([[nxt]], device="cuda"), past_key_values=past, use_cache=True)
            past = r.past_key_values
            nxt = int(r.logits[0, -1].float().argmax())
    return out


def compare(rows, hf_rows, toks):
    norm = np.maximum(np.linalg.norm(hf_rows, axis=1), 1e-30)
    rel = np.linalg.norm(rows - hf_rows, axis=1) / norm
    am = hf_rows.argmax(axis=1)
    bad = [i for i in range(len(toks)) if am[i] != toks[i]]
    margins = []
    for i in bad:
        s = np.sort(hf_rows[i])
        margins.append(float(s[-1] - s[-2]))
    return float(rel.max()), float(rel.mean()), bad, margins


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tessera", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--presets", default="qwen3-0.6b,llama-3.2-1b")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--graphs", default="1,0", help="TESSERA_CUDA_GRAPHS values to run")
    ap.add_argument("--tokenizers", default=None)
    ap.add_argument("--long-words", type=int, default=500)
    ap.add_argument("--out", default=None)
    ap.add_argument("--only-checkpoints", action="store_true")
    a = ap.parse_args()
    if a.only_checkpoints:
        for preset in a.presets.split(","):
            write_checkpoint(preset, pathlib.Path(a.work) / preset, a.tokenizers)
        return 0
    import torch
    from transformers import AutoModelForCausalLM

    work = pathlib.Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    prompts = PROMPTS + [long_text(a.long_words)]
    lines = []

    def emit(s):
        print(s, flush=True)
        lines.append(s)

    emit(f"tessera --device cuda vs transformers {__import__('transformers').__version__}, "
         f"torch {torch.__version__}, {torch.cuda.get_device_name()}; {a.steps} greedy steps")
    emit("| preset | prompt | graphs | prompt toks | rel err vs hf bf16 (max/mean) | "
         "rel err vs hf f32 (max/mean) | hf bf16 vs hf f32 (max) | "
         "argmax disagreements bf16 / f32 (hf margin) | "
         "free-run bf16 equal steps | tessera s |")
    emit("| --- | --- | --- | ---: | --- | --- | --- | --- | ---: | ---: |")
    worst = {"bf16": 0.0, "f32": 0.0}
    n_fail = 0
    for preset in a.presets.split(","):
        mdir = work / preset
        t0 = time.time()
        if not (mdir / "model.safetensors").exists():
            write_checkpoint(preset, mdir, a.tokenizers)
        emit(f"<!-- {preset}: checkpoint ready in {time.time() - t0:.1f} s -->")
        m16 = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.bfloat16).cuda().eval()
        m32 = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.bfloat16).float().cuda().eval()
        for pi, prompt in enumerate(prompts):
            for g in a.graphs.split(","):
                dump = work / f"{preset}-{pi}-{g}.bin"
                try:
                    ids, rows, log, secs = run_tessera(a.tessera, mdir, prompt, a.steps, dump, g)
                except Exception as e:  # one bad run is a row, not the end of the table
                    emit(f"| {preset} | {pi} | {g} | | FAILED: {e} | | | | | |")
                    n_fail += 1
                    continue
                toks = rows.argmax(axis=1).tolist()
                seq = ids.tolist() + toks[:-1]
                h16 = hf_teacher(torch, m16, seq, len(ids), len(rows))
                h32 = hf_teacher(torch, m32, seq, len(ids), len(rows))
                mx16, mn16, bad16, mg16 = compare(rows, h16, toks)
                mx32, mn32, bad32, mg32 = compare(rows, h32, toks)
                hf_gap = compare(h16, h32, toks)[0]
                free = hf_greedy(torch, m16, ids.tolist(), len(rows))
                eq = next((i for i in range(len(free)) if free[i] != toks[i]), len(free))
                worst["bf16"] = max(worst["bf16"], mx16)
                worst["f32"] = max(worst["f32"], mx32)
                # transformers in bf16 rounds every activation; its own distance from the float32
                # evaluation of the same weights (hf_gap) bounds how close anything exact can be.
                if mx32 > 1e-2 or bad32 or (mx16 > 1e-2 and mx16 > 1.25 * hf_gap):
                    n_fail += 1
                emit(f"| {preset} | {pi} | {g} | {len(ids)} | {mx16:.2e} / {mn16:.2e} | "
                     f"{mx32:.2e} / {mn32:.2e} | {hf_gap:.2e} | {len(bad16)} / {len(bad32)} "
                     f"{[round(x, 4) for x in (mg16 + mg32)][:6]} | {eq}/{len(free)} | "
                     f"{secs:.1f} |")
        del m16, m32
        torch.cuda.empty_cache()
    emit(f"worst relative error: {worst['bf16']:.2e} vs hf bf16, {worst['f32']:.2e} vs hf f32; "
         f"{n_fail} failing rows (rel err > 1e-2 vs f32, an argmax differing from f32, or rel err "
         f"vs bf16 > 1e-2 and > 1.25x hf bf16's own distance from f32)")
    if a.out:
        pathlib.Path(a.out).write_text("\n".join(lines) + "\n")
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
