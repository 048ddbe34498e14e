#!/usr/bin/env python3
"""Golden reference logits from Hugging Face transformers for the tiny test checkpoints.

For each tiny preset: generate the f32 checkpoint with tools/gen_checkpoint.py, encode a few prompts
with the real tokenizer (one longer than 1,100 tokens), run transformers in float32 with eager
attention, and write tests/golden/<preset>.json holding, for a handful of positions per prompt,
the top-20 (id, logit), the argmax, and the sum and sum of squares of the whole logit row; plus a
32-token greedy continuation per prompt (argmax at every step, no stop at EOS) with each step's
margin between the best and second-best logit, so a consumer can tell a near-tie from a bug.

  golden_logits.py --tokenizers DIR --out DIR [--device cuda|cpu] [--presets a,b]
Needs torch, transformers, tokenizers and numpy (not part of the test requirements).
"""
import argparse
import json
import pathlib
import sys
import tempfile
import time
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import gen_checkpoint  # noqa: E402

TINY = ["tiny-qwen3", "tiny-qwen2", "tiny-llama", "tiny-llama-tied"]
TOP_K = 20
GREEDY_STEPS = 32
LONG_TOKENS = 1200

WORDS = ("the a of to and in is was for on that with as by at from it an be this are or his "
         "her they one had not but what all were when we there can who been has more if no out "
         "so said up its about into than them only other new some could time these two may then "
         "do first any my now such like our over man me even most made after also did many "
         "before must through back years where much your way well down should because each just "
         "those people mr how too little state good very make world still own see men work long "
         "get here between both life being under never day same another know while last might us "
         "great old year off come since against go came right used take three river mountain "
         "lantern harbour quietly 1987 3.14 naïve café résumé Zürich 東京 données ünïcödé").split()


def long_text(n_words, seed=7):
    """Deterministic pseudo-prose from a fixed word list (splitmix64 picks the words)."""
    out, x = [], seed
    mask = (1 << 64) - 1
    for i in range(n_words):
        x = (x + 0x9E3779B97F4A7C15) & mask
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
        w = WORDS[z % len(WORDS)]
        if i % 17 == 16:
            w += "."
        elif i % 11 == 10:
            w += ","
        out.append(w)
        if i % 97 == 96:
            out.append("\n\n")
    return " ".join(out)


def prompts_for(family):
    chat = ("<|im_start|>user\nWhat is 2+2? Answer briefly.<|im_end|>\n<|im_start|>assistant\n"
            if family == "qwen3" else
            "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2? Answer briefly.<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n")
    return ["Hello",
            "The quick brown fox jumps over the lazy dog. 1234567890 — naïve café, 日本語のテキスト 🙂!",
            chat,
            long_text(1600)]


def row_summary(row, pos):
    import torch
    vals, idx = torch.topk(row, TOP_K)
    r64 = row.double()
    return {"pos": pos, "argmax": int(torch.argmax(row)),
            "top": [[int(i), float(v)] for i, v in zip(idx.tolist(), vals.tolist())],
            "sum": float(r64.sum()), "sumsq": float((r64 * r64).sum())}


def run_preset(preset, tok_root, device, log):
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    work = pathlib.Path(tempfile.mkdtemp(prefix=f"golden-{preset}-"))
    t0 = time.time()
    gen_checkpoint.generate(preset, work, dtype="f32", shards=1, seed=0, tokenizers=tok_root)
    sha = gen_checkpoint.sha256(work / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(str(work), dtype=torch.float32,
                                                 attn_implementation="eager").to(device).eval()
    log(f"{preset}: generated and loaded in {time.time() - t0:.1f}s, sha256 {sha[:16]}")
    tok = Tokenizer.from_file(str(work / "tokenizer.json"))
    fam = gen_checkpoint.PRESETS[preset]["family"]
    out = {"preset": preset,
           "generator": f"tools/gen_checkpoint.py {preset} DIR --dtype f32 --seed 0",
           "safetensors_sha256": sha,
           "reference": f"transformers float32 eager attention on {device}; greedy = argmax per "
                        "step without stopping at EOS",
           "prompts": [], "greedy": []}
    cpu_model = None
    for pi, text in enumerate(prompts_for(fam)):
        ids = tok.encode(text).ids
        if pi == 3:
            assert len(ids) > LONG_TOKENS, len(ids)
            ids = ids[:LONG_TOKENS]
        x = torch.tensor([ids], device=device)
        with torch.no_grad():
            logits = model(x).logits[0].float()
        T = len(ids)
        pos = sorted({0, T // 2, T - 1} | ({1000, 1100} if T > 1100 else set()))
        out["prompts"].append({"ids": ids, "rows": [row_summary(logits[p].cpu(), p) for p in pos]})
        if pi == 3 and device != "cpu":  # cross-check the device against the CPU once per preset
            if cpu_model is None:
                cpu_model = AutoModelForCausalLM.from_pretrained(
                    str(work), dtype=torch.float32, attn_implementation="eager").eval()
            with torch.no_grad():
                ref = cpu_model(x.cpu()).logits[0].float()
            err = (ref - logits.cpu()).abs().max().item() / ref.abs().max().item()
            log(f"{preset}: prompt {pi} device vs cpu max rel err {err:.3g}")
        # Greedy continuation, recomputing the whole sequence each step (no cache subtleties).
        seq, new, margins = list(ids), [], []
        with torch.no_grad():
            for _ in range(GREEDY_STEPS):
                row = model(torch.tensor([seq], device=device),
                            logits_to_keep=1).logits[0, -1].float()
                v, i = torch.topk(row, 2)
                new.append(int(i[0]))
                margins.append(float(v[0] - v[1]))
                seq.append(int(i[0]))
        out["greedy"].append({"prompt": pi, "ids": new, "margins": margins})
        log(f"{preset}: prompt {pi}: {T} tokens, rows at {pos}, greedy {new[:8]}...")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizers", required=True, help="directory with qwen3/ and llama3/")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default=None)
    ap.add_argument("--presets", default=",".join(TINY))
    a = ap.parse_args(argv)
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False  # true float32 products
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    outdir = pathlib.Path(a.out)
    outdir.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(msg, flush=True)

    import transformers
    log(f"torch {torch.__version__}, transformers {transformers.__version__}, device {device}")
    rc = 0
    for preset in a.presets.split(","):
        try:
            res = run_preset(preset, a.tokenizers, device, log)
            path = outdir / f"{preset}.json"
            path.write_text(json.dumps(res, separators=(",", ":")) + "\n")
            log(f"{preset}: wrote {path} ({path.stat().st_size} bytes)")
        except Exception:
            traceback.print_exc()
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
