"""tessera bench (CPU here; --device cuda runs the same code on a GPU machine) and generate's
hidden --dump-logits/--ignore-eos used by tools/cuda_e2e.py: output shape, the dump's layout,
and that a shorter run dumps the same leading rows."""
import json
import random
import struct
import subprocess

import numpy as np


def test_bench_json(tessera, shared):
    rng = random.Random()
    b, p, g = rng.randint(1, 4), rng.randint(1, 64), rng.randint(1, 16)
    r = subprocess.run([tessera, "bench", str(shared / "models" / "stories260K-hf"), "--batch",
                        str(b), "--prompt-tokens", str(p), "--gen-tokens", str(g), "--threads",
                        "2", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["batch"], out["prompt_tokens"], out["gen_tokens"]) == (b, p, g)
    assert out["prefill_tok_s"] > 0 and out["decode_tok_s"] > 0


def test_bench_rejects_bad_flags(tessera, shared):
    model = str(shared / "models" / "stories260K-hf")
    for args in (["--batch", "0"], ["--gen-tokens", "x"], ["--bogus", "1"], []):
        r = subprocess.run([tessera, "bench", *([model] if args else []), *args],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and r.stdout == "", (args, r.stderr)


def test_dump_logits_rows_are_the_greedy_steps(tessera, shared, tmp_path):
    model = shared / "models" / "stories260K-hf"
    n = random.randint(5, 40)
    dump = tmp_path / "d.bin"
    r = subprocess.run([tessera, "generate", str(model), "--prompt", "Once upon", "--max-tokens",
                        str(n), "--ignore-eos", "--dump-logits", str(dump)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    raw = dump.read_bytes()
    n_prompt, vocab = struct.unpack("<ii", raw[:8])
    assert vocab == 512 and n_prompt > 1
    ids = list(struct.unpack(f"<{n_prompt}i", raw[8:8 + 4 * n_prompt]))
    rows = np.frombuffer(raw[8 + 4 * n_prompt:], dtype="<f4").reshape(-1, vocab)
    assert rows.shape[0] == n and np.isfinite(rows).all()
    # A shorter run dumps exactly the first rows: row i is the step after i greedy tokens.
    toks = rows.argmax(axis=1).tolist()
    k = random.randrange(n)
    dump2 = tmp_path / "d2.bin"
    r = subprocess.run([tessera, "generate", str(model), "--prompt", "Once upon", "--max-tokens",
                        str(k + 1), "--ignore-eos", "--dump-logits", str(dump2)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    raw2 = dump2.read_bytes()
    rows2 = np.frombuffer(raw2[8 + 4 * n_prompt:], dtype="<f4").reshape(-1, vocab)
    assert rows2.shape[0] == k + 1
    assert np.array_equal(rows2, rows[:k + 1])
    assert rows2.argmax(axis=1).tolist() == toks[:k + 1] and ids
