#!/usr/bin/env python3
"""Deterministic random checkpoints in Hugging Face form (and optionally GGUF) for tests and
benchmarks.

Every weight is a pure function of (seed, tensor name, element index) through splitmix64, computed
with numpy's wrapping uint64 arithmetic, so the bytes are identical on every machine and numpy
version (no numpy RNG). Widths are tiny for the test presets but the vocabularies are the real
ones, so the real tokenizers (copied beside the weights) work with them.

  gen_checkpoint.py PRESET OUT_DIR [--dtype f32|f16|bf16] [--shards N] [--seed S] [--gguf FILE]
"""
import argparse
import hashlib
import json
import math
import multiprocessing
import os
import pathlib
import shutil
import struct
import sys

import numpy as np

QWEN3_EOS = {"bos": 151643, "eos": 151645, "gen_eos": [151645, 151643]}
LLAMA3_EOS = {"bos": 128000, "eos": 128001, "gen_eos": [128001, 128008, 128009]}
LLAMA3_SCALING_31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
LLAMA3_SCALING_32 = dict(LLAMA3_SCALING_31, factor=32.0)

# hidden, layers, heads, kv heads, head_dim, intermediate, vocab, max_pos, theta, eps, tied, ...
PRESETS = {
    # head_dim 32 != hidden/heads: exercises head_dim read from the config.
    "tiny-qwen3": dict(arch="Qwen3ForCausalLM", model_type="qwen3", family="qwen3", hidden=64,
                       layers=3, heads=4, kv_heads=2, head_dim=32, inter=128, vocab=151936,
                       max_pos=4096, theta=1000000.0, eps=1e-6, tied=True, scaling=None,
                       ids=QWEN3_EOS),
    "tiny-qwen2": dict(arch="Qwen2ForCausalLM", model_type="qwen2", family="qwen3", hidden=64,
                       layers=2, heads=4, kv_heads=2, head_dim=16, inter=128, vocab=151936,
                       max_pos=4096, theta=1000000.0, eps=1e-6, tied=False, scaling=None,
                       ids=QWEN3_EOS),
    "tiny-llama": dict(arch="LlamaForCausalLM", model_type="llama", family="llama3", hidden=64,
                       layers=3, heads=4, kv_heads=2, head_dim=16, inter=128, vocab=128256,
                       max_pos=4096, theta=500000.0, eps=1e-5, tied=False,
                       scaling=LLAMA3_SCALING_31, ids=LLAMA3_EOS),
    "tiny-llama-tied": dict(arch="LlamaForCausalLM", model_type="llama", family="llama3",
                            hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, inter=128,
                            vocab=128256, max_pos=4096, theta=500000.0, eps=1e-5, tied=True,
                            scaling=LLAMA3_SCALING_32, ids=LLAMA3_EOS),
    # Published shapes, for benchmarks only.
    "qwen3-0.6b": dict(arch="Qwen3ForCausalLM", model_type="qwen3", family="qwen3", hidden=1024,
                       layers=28, heads=16, kv_heads=8, head_dim=128, inter=3072, vocab=151936,
                       max_pos=40960, theta=1000000.0, eps=1e-6, tied=True, scaling=None,
                       ids=QWEN3_EOS),
    "llama-3.2-1b": dict(arch="LlamaForCausalLM", model_type="llama", family="llama3",
                         hidden=2048, layers=16, heads=32, kv_heads=8, head_dim=64, inter=8192,
                         vocab=128256, max_pos=131072, theta=500000.0, eps=1e-5, tied=True,
                         scaling=LLAMA3_SCALING_32, ids=LLAMA3_EOS),
    "llama-3.1-8b": dict(arch="LlamaForCausalLM", model_type="llama", family="llama3",
                         hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, inter=14336,
                         vocab=128256, max_pos=131072, theta=500000.0, eps=1e-5, tied=False,
                         scaling=LLAMA3_SCALING_31, ids=LLAMA3_EOS),
}

M64 = (1 << 64) - 1


def fnv1a64(s):
    h = 0xCBF29CE484222325
    for b in s.encode():
        h = ((h ^ b) * 0x100000001B3) & M64
    return h


def splitmix64_np(x):
    """splitmix64 finaliser over a uint64 array (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniform(seed, name, n, chunk=1 << 24):
    """n float32 values in [-1, 1), a function of (seed, name, index) only."""
    key = np.uint64((fnv1a64(name) ^ ((seed * 0x9E3779B97F4A7C15) & M64)) & M64)
    out = np.empty(n, dtype=np.float32)
    with np.errstate(over="ignore"):
        for s in range(0, n, chunk):
            idx = np.arange(s, min(n, s + chunk), dtype=np.uint64)
            v = splitmix64_np(splitmix64_np(idx ^ key) + key)
            # top 24 bits -> exact float32 in [0, 1)
            out[s:s + len(idx)] = (v >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -24)
    return out * np.float32(2.0) - np.float32(1.0)


def tensor_specs(p):
    """(name, shape, kind) in HF naming; kind picks the value distribution."""
    d, hd, ff, v = p["hidden"], p["head_dim"], p["inter"], p["vocab"]
    q, kv = p["heads"] * hd, p["kv_heads"] * hd
    specs = [("model.embed_tokens.weight", (v, d), "embed")]
    for l in range(p["layers"]):
        pre = f"model.layers.{l}."
        specs += [(pre + "input_layernorm.weight", (d,), "norm"),
                  (pre + "self_attn.q_proj.weight", (q, d), "linear"),
                  (pre + "self_attn.k_proj.weight", (kv, d), "linear"),
                  (pre + "self_attn.v_proj.weight", (kv, d), "linear")]
        if p["arch"] == "Qwen2ForCausalLM":
            specs += [(pre + "self_attn.q_proj.bias", (q,), "bias"),
                      (pre + "self_attn.k_proj.bias", (kv,), "bias"),
                      (pre + "self_attn.v_proj.bias", (kv,), "bias")]
        if p["arch"] == "Qwen3ForCausalLM":
            specs += [(pre + "self_attn.q_norm.weight", (hd,), "norm"),
                      (pre + "self_attn.k_norm.weight", (hd,), "norm")]
        specs += [(pre + "self_attn.o_proj.weight", (d, q), "linear"),
                  (pre + "post_attention_layernorm.weight", (d,), "norm"),
                  (pre + "mlp.gate_proj.weight", (ff, d), "linear"),
                  (pre + "mlp.up_proj.weight", (ff, d), "linear"),
                  (pre + "mlp.down_proj.weight", (d, ff), "linear")]
    specs.append(("model.norm.weight", (d,), "norm"))
    if not p["tied"]:
        specs.append(("lm_head.weight", (v, d), "head"))
    return specs


def make_tensor(seed, name, shape, kind):
    n = int(np.prod(shape))
    u = uniform(seed, name, n).reshape(shape)
    if kind == "norm":  # around 1 so the residual stream keeps its scale
        return np.float32(1.0) + np.float32(0.1) * u
    if kind == "bias":
        return np.float32(0.1) * u
    if kind == "embed":
        return u
    # linear / head: uniform * sqrt(3 / fan_in) has unit gain; the head gets 2x for peakier rows
    gain = 2.0 if kind == "head" else 1.0
    return u * np.float32(gain * math.sqrt(3.0 / shape[1]))


def to_bf16_bits(a):
    """float32 -> bfloat16 bit patterns, round to nearest even."""
    b = a.astype(np.float32).view(np.uint32).astype(np.uint64)
    b = (b + np.uint64(0x7FFF) + ((b >> np.uint64(16)) & np.uint64(1))) >> np.uint64(16)
    return b.astype(np.uint16)


def encode(a, dtype):
    """(bytes, safetensors dtype name, array for GGUF, ggml raw type or None)."""
    if dtype == "f32":
        return a.astype("<f4"), "F32"
    if dtype == "f16":
        return a.astype("<f2"), "F16"
    return to_bf16_bits(a).astype("<u2"), "BF16"


ST_BYTES = {"F32": 4, "F16": 2, "BF16": 2}
ST_NAMES = {"f32": "F32", "f16": "F16", "bf16": "BF16"}


def write_safetensors(path, entries, produce):
    """entries: [(name, shape, st_dtype)]; produce(name) returns that tensor's encoded array.
    The header (sorted keys, padded to 8 bytes) is written first and the tensors are then made
    and written one at a time, so a billion-parameter file never sits in memory whole."""
    header, off = {}, 0
    for name, shape, sd in entries:
        nb = int(np.prod(shape, dtype=np.int64)) * ST_BYTES[sd]
        header[name] = {"dtype": sd, "shape": list(shape), "data_offsets": [off, off + nb]}
        off += nb
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for name, shape, sd in entries:
            arr = np.ascontiguousarray(produce(name))
            assert arr.shape == tuple(shape) and arr.nbytes == header[name]["data_offsets"][1] - \
                header[name]["data_offsets"][0], name
            f.write(arr.tobytes())


def hf_config(p, dtype):
    cfg = {
        "architectures": [p["arch"]], "model_type": p["model_type"],
        "attention_bias": p["arch"] == "Qwen2ForCausalLM", "attention_dropout": 0.0,
        "bos_token_id": p["ids"]["bos"], "eos_token_id": p["ids"]["eos"],
        "head_dim": p["head_dim"], "hidden_act": "silu", "hidden_size": p["hidden"],
        "initializer_range": 0.02, "intermediate_size": p["inter"],
        "max_position_embeddings": p["max_pos"], "num_attention_heads": p["heads"],
        "num_hidden_layers": p["layers"], "num_key_value_heads": p["kv_heads"],
        "rms_norm_eps": p["eps"], "rope_scaling": p["scaling"], "rope_theta": p["theta"],
        "tie_word_embeddings": p["tied"], "torch_dtype": {"f32": "float32", "f16": "float16",
                                                           "bf16": "bfloat16"}[dtype],
        "use_cache": True, "vocab_size": p["vocab"],
    }
    if p["model_type"] == "llama":
        cfg["mlp_bias"] = False
    if p["model_type"] == "qwen2":
        cfg["use_sliding_window"] = False
        cfg["sliding_window"] = None
    return cfg


def default_tokenizers():
    env = os.environ.get("TESSERA_SHARED")
    root = pathlib.Path(env) if env else pathlib.Path(__file__).resolve().parents[2] / "shared"
    return root / "tokenizers"


def llama_permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf q/k row order for the interleaved (GPT-J) RoPE."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def llama3_rope_factors(p):
    s, hd = p["scaling"], p["head_dim"]
    lo_wl = s["original_max_position_embeddings"] / s["low_freq_factor"]
    hi_wl = s["original_max_position_embeddings"] / s["high_freq_factor"]
    out = []
    for i in range(0, hd, 2):
        freq = 1.0 / (p["theta"] ** (i / hd))
        wl = 2 * math.pi / freq
        if wl < hi_wl:
            out.append(1.0)
        elif wl > lo_wl:
            out.append(s["factor"])
        else:
            sm = (s["original_max_position_embeddings"] / wl - s["low_freq_factor"]) / (
                s["high_freq_factor"] - s["low_freq_factor"])
            out.append(1.0 / ((1 - sm) / s["factor"] + sm))
    return np.array(out, dtype=np.float32)


GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf):
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    parts = hf.split(".", 3)  # model layers N rest
    return f"blk.{parts[2]}.{GGUF_NAMES[parts[3]]}"


def gguf_vocab(tok_dir, vocab_size):
    """Tokens, types and merges the way convert_hf_to_gguf.py's BPE path lays them out."""
    tj = json.loads((tok_dir / "tokenizer.json").read_text())
    vocab = dict(tj["model"]["vocab"])
    special = {}
    for a in tj.get("added_tokens", []):
        vocab[a["content"]] = a["id"]
        special[a["id"]] = a.get("special", False)
    rev = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in rev:
            tokens.append(f"[PAD{i}]")
            types.append(5)  # UNUSED
        elif i in special:
            tokens.append(rev[i])
            types.append(3 if special[i] else 4)  # CONTROL / USER_DEFINED
        else:
            tokens.append(rev[i])
            types.append(1)  # NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    return tokens, types, merges


def write_gguf(path, p, preset, tensors, dtype, tok_dir, gguf_type=None):
    import gguf  # only needed here

    arch = p["model_type"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(preset)
    w.add_block_count(p["layers"])
    w.add_context_length(p["max_pos"])
    w.add_embedding_length(p["hidden"])
    w.add_feed_forward_length(p["inter"])
    w.add_head_count(p["heads"])
    w.add_head_count_kv(p["kv_heads"])
    w.add_key_length(p["head_dim"])
    w.add_value_length(p["head_dim"])
    w.add_rope_dimension_count(p["head_dim"])
    w.add_layer_norm_rms_eps(p["eps"])
    w.add_rope_freq_base(p["theta"])
    w.add_file_type({"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7, "q4_0": 2}[gguf_type or dtype])
    tokens, types, merges = gguf_vocab(tok_dir, p["vocab"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe" if p["family"] == "llama3" else "qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(p["ids"]["bos"])
    w.add_eos_token_id(p["ids"]["eos"] if p["family"] == "llama3" else p["ids"]["gen_eos"][0])
    if p["family"] == "llama3":
        w.add_eot_token_id(128009)  # <|eot_id|> ends a chat turn
    tc = json.loads((tok_dir / "tokenizer_config.json").read_text())
    w.add_add_bos_token(p["family"] == "llama3")
    if tc.get("chat_template"):
        w.add_chat_template(tc["chat_template"])
    raw = {"f32": None, "f16": None, "bf16": gguf.GGMLQuantizationType.BF16}[dtype]
    quant = {None: None, "q8_0": gguf.GGMLQuantizationType.Q8_0,
             "q4_0": gguf.GGMLQuantizationType.Q4_0}[gguf_type]
    if p["scaling"] is not None:
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(p))
    for name, arr32 in tensors:
        a = arr32
        if p["model_type"] == "llama" and name.endswith("q_proj.weight"):
            a = llama_permute(a, p["heads"])
        elif p["model_type"] == "llama" and name.endswith("k_proj.weight"):
            a = llama_permute(a, p["kv_heads"])
        enc, _ = encode(a, dtype) if a.ndim == 2 else (a.astype("<f4"), "F32")
        # llama.cpp keeps 1-D tensors (norms, biases) in F32 whatever the file type.
        if a.ndim == 2 and quant is not None:  # gguf-py's quantizer, the bytes llama.cpp reads
            w.add_tensor(gguf_name(name), gguf.quants.quantize(a.astype(np.float32), quant),
                         raw_dtype=quant)
        elif a.ndim == 2 and raw is not None:
            w.add_tensor(gguf_name(name), enc, raw_dtype=raw)
        else:
            w.add_tensor(gguf_name(name), enc)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _encoded(job):
    """Worker of --jobs: one tensor, made and encoded (a top-level function so it pickles)."""
    seed, name, shape, kind, dtype = job
    return name, encode(make_tensor(seed, name, shape, kind), dtype)[0]


def generate(preset, out_dir, dtype="f32", shards=1, seed=0, gguf_path=None, tokenizers=None,
             gguf_type=None, jobs=1):
    p = PRESETS[preset]
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = pathlib.Path(tokenizers or default_tokenizers()) / p["family"]
    specs = tensor_specs(p)
    (out / "config.json").write_text(json.dumps(hf_config(p, dtype), indent=2) + "\n")
    gen = {"bos_token_id": p["ids"]["bos"], "eos_token_id": p["ids"]["gen_eos"],
           "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tok_dir / f, out / f)

    big = preset not in ("tiny-qwen3", "tiny-qwen2", "tiny-llama", "tiny-llama-tied")
    # Round-robin over the shards: every shard gets tensors, and each layer spans several files.
    groups = [specs[i::shards] for i in range(min(shards, len(specs)))]
    weight_map, total_bytes, keep = {}, 0, []
    kinds = {n: (sh, k) for n, sh, k in specs}

    def produce(name):
        a = make_tensor(seed, name, *kinds[name])
        if gguf_path and not big:
            keep.append((name, a))
        return encode(a, dtype)[0]

    pool = None
    if jobs > 1 and not (gguf_path and not big):
        # The tensors are independent: make them in worker processes, in the order the files
        # are written, and hand each to the writer as it comes (the same bytes as one process).
        order = [(seed, n, *kinds[n], dtype) for g in groups for n, _, _ in sorted(g)]
        pool = multiprocessing.Pool(jobs)
        made = pool.imap(_encoded, order)

        def produce(name):  # noqa: F811 (the parallel variant of the one above)
            got, arr = next(made)
            assert got == name, (got, name)
            return arr

    for gi, group in enumerate(groups):
        fname = ("model.safetensors" if len(groups) == 1
                 else f"model-{gi + 1:05d}-of-{len(groups):05d}.safetensors")
        entries = [(name, shape, ST_NAMES[dtype]) for name, shape, _ in sorted(group)]
        for name, shape, sd in entries:
            weight_map[name] = fname
            total_bytes += int(np.prod(shape, dtype=np.int64)) * ST_BYTES[sd]
        write_safetensors(out / fname, entries, produce)
    if pool:
        pool.close()
        pool.join()
    if len(groups) > 1:
        idx = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(idx, indent=2) + "\n")
    elif (out / "model.safetensors.index.json").exists():
        (out / "model.safetensors.index.json").unlink()
    if gguf_path:
        if big:  # regenerate one at a time rather than holding a billion floats twice
            keep = ((n, make_tensor(seed, n, s, k)) for n, s, k in specs)
        write_gguf(gguf_path, p, preset, keep, dtype, tok_dir, gguf_type)
    return out


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("preset", choices=sorted(PRESETS))
    ap.add_argument("out_dir")
    ap.add_argument("--dtype", choices=["f32", "f16", "bf16"], default="f32")
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gguf", metavar="FILE", help="also write the weights as GGUF")
    ap.add_argument("--gguf-type", choices=["q8_0", "q4_0"],
                    help="quantize the GGUF's 2-D weights (default: --dtype)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="make the tensors in this many processes (same bytes)")
    ap.add_argument("--tokenizers", help="directory holding qwen3/ and llama3/ tokenizer dirs "
                    "(default: $TESSERA_SHARED/tokenizers or ../shared/tokenizers)")
    a = ap.parse_args(argv)
    if a.shards < 1:
        ap.error("--shards must be >= 1")
    generate(a.preset, a.out_dir, a.dtype, a.shards, a.seed, a.gguf, a.tokenizers,
             a.gguf_type, max(1, a.jobs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
