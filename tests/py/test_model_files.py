"""Model files from the outside: the generated checkpoints against the reference readers
(safetensors, gguf) and the golden files, and bad model directories through the binary."""
import hashlib
import json
import pathlib
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY_PRESETS = ("tiny-qwen3", "tiny-qwen2", "tiny-llama", "tiny-llama-tied")
sys.path.insert(0, str(ROOT / "tools"))
import gen_checkpoint  # noqa: E402


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_checkpoint_is_the_golden_one(checkpoints, preset):
    """The cached checkpoint hashes to what transformers saw when the golden file was made."""
    ck = checkpoints[preset]
    golden = json.loads(ck["golden"].read_text())
    assert golden["preset"] == preset
    assert sha256(ck["hf"] / "model.safetensors") == golden["safetensors_sha256"]
    assert ck["golden"].stat().st_size < 200_000
    cfg = json.loads((ck["hf"] / "config.json").read_text())
    long_rows = 0
    for p in golden["prompts"]:
        assert all(0 <= i < cfg["vocab_size"] for i in p["ids"])
        for r in p["rows"]:
            top = r["top"]
            assert len(top) == 20 and r["argmax"] == top[0][0]
            assert all(a[1] >= b[1] for a, b in zip(top, top[1:]))
            assert r["sumsq"] > 0
            long_rows += r["pos"] > 1000
    assert long_rows >= 1
    assert max(len(p["ids"]) for p in golden["prompts"]) > 1100
    assert len(golden["greedy"]) == len(golden["prompts"])
    assert all(len(g["ids"]) == 32 == len(g["margins"]) for g in golden["greedy"])


# One preset: gguf's reader walks all 128k token strings in Python, which is slow.
@pytest.mark.parametrize("preset", ["tiny-llama"])
def test_reference_readers_agree(checkpoints, preset):
    """safetensors' and gguf's own readers see the generator's values in both files."""
    import gguf

    ck = checkpoints[preset]
    p = gen_checkpoint.PRESETS[preset]
    hf = load_file(str(ck["hf"] / "model.safetensors"))
    specs = gen_checkpoint.tensor_specs(p)
    assert set(hf) == {n for n, _, _ in specs}
    rng = random.Random(len(preset))
    for name, shape, kind in rng.sample(specs, 6):
        assert np.array_equal(hf[name], gen_checkpoint.make_tensor(0, name, shape, kind))
    r = gguf.GGUFReader(str(ck["gguf"]))
    tensors = {t.name: np.asarray(t.data) for t in r.tensors}
    assert r.fields["general.architecture"].contents() == p["model_type"]
    assert len(r.fields["tokenizer.ggml.tokens"].data) == p["vocab"]
    for name in hf:
        g = tensors[gen_checkpoint.gguf_name(name)]
        want = hf[name]
        if p["model_type"] == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            n_head = p["heads"] if "q_proj" in name else p["kv_heads"]
            want = gen_checkpoint.llama_permute(want, n_head)
        assert np.array_equal(g.reshape(want.shape), want), name
    if p["scaling"]:
        assert np.allclose(tensors["rope_freqs.weight"], gen_checkpoint.llama3_rope_factors(p))


def test_sharded_output_matches_single(tmp_path, shared):
    gen_checkpoint.generate("tiny-llama-tied", tmp_path / "one", tokenizers=shared / "tokenizers")
    gen_checkpoint.generate("tiny-llama-tied", tmp_path / "many", shards=3,
                            tokenizers=shared / "tokenizers")
    one = load_file(str(tmp_path / "one" / "model.safetensors"))
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    many = {}
    for f in files:
        part = load_file(str(tmp_path / "many" / f))
        assert all(index["weight_map"][k] == f for k in part)
        many.update(part)
    assert set(one) == set(many)
    assert all(np.array_equal(one[k], many[k]) for k in one)


def _bad_model(tmp_path, shared, edit):
    d = tmp_path / "m"
    shutil.copytree(shared / "models" / "stories260K-hf", d)
    for f in d.iterdir():
        f.chmod(0o644)
    edit(d)
    return d


def _edit_config(**changes):
    def edit(d):
        cfg = json.loads((d / "config.json").read_text())
        for k, v in changes.items():
            if v is None:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


def _truncate(d):
    p = d / "model.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[: random.Random(len(data)).randrange(8, len(data) - 1)])


@pytest.mark.parametrize("edit, message", [
    (_edit_config(hidden_size=None), "config.json: missing field 'hidden_size'"),
    (_edit_config(num_attention_heads="8"), "config.json: field 'num_attention_heads' must be an integer"),
    (_edit_config(architectures=["MambaForCausalLM"]), "config.json: unsupported architecture 'MambaForCausalLM'"),
    (_edit_config(intermediate_size=171), "model.safetensors: tensor 'model.layers.0.mlp.gate_proj.weight' has shape [172, 64], expected [171, 64]"),
    (_truncate, "model.safetensors: "),
    (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors or model.safetensors.index.json"),
])
def test_bad_model_one_error_line(tessera, tmp_path, shared, edit, message):
    d = _bad_model(tmp_path, shared, edit)
    r = subprocess.run([tessera, "generate", str(d), "--max-tokens", "2"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1
    errors = [l for l in r.stderr.splitlines() if l.startswith("tessera generate:")]
    assert len(errors) == 1, r.stderr
    assert message in errors[0], r.stderr
