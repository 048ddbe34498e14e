"""Tokenizer parity with Hugging Face `tokenizers`: llama.cpp's test vectors, 10,000 generated
strings per tokenizer (with and without BOS/EOS, with special-token parsing on and off, raw bytes
with invalid UTF-8), decode of random id sequences, and decode(encode(s)) round trips. The binary
is spawned once per tokenizer and mode (--jsonl)."""
import json
import os
import pathlib
import random
import subprocess
import sys

import pytest

tokenizers = pytest.importorskip("tokenizers")

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import tok_gen  # noqa: E402

N_STRINGS = 10000
TOKENIZERS = {  # name -> (directory under shared, NFC normalizer, byte-level)
    "qwen3": ("tokenizers/qwen3", True, True),
    "llama3": ("tokenizers/llama3", False, True),
    "stories260K": ("models/stories260K-hf", False, False),
}


@pytest.fixture(scope="session")
def tok_bin(tessera):
    return os.environ.get("TESSERA_BIN", tessera)


def run_jsonl(exe, model, lines, *flags):
    """Feeds JSON lines to one `tessera tokenize --jsonl -` process; returns parsed output lines."""
    data = "".join(json.dumps(x, ensure_ascii=True) + "\n" for x in lines)
    r = subprocess.run([exe, "tokenize", str(model), "--jsonl", "-", *flags], input=data.encode(),
                       capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    out = r.stdout.decode().split("\n")[:-1]
    assert len(out) == len(lines)
    return [json.loads(x) for x in out]


def hf_tokenizer(shared, name):
    return tokenizers.Tokenizer.from_file(str(shared / TOKENIZERS[name][0] / "tokenizer.json"))


def specials_of(tok):
    return [t.content for t in tok.get_added_tokens_decoder().values()]


def gen_strings(name, tok, n, seed):
    rng = random.Random(f"{name}-{seed}")
    sp = specials_of(tok)
    strs = [tok_gen.random_text(rng, sp) for _ in range(n)]
    assert len(set(strs)) > n * 0.9  # the generator is random, not constant
    return strs


def first_diff(ours, ref, inputs):
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            return f"input {inputs[i]!r}: ours {a} hf {b}"
    return None


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_encode_generated(tok_bin, shared, name):
    tok = hf_tokenizer(shared, name)
    model = shared / TOKENIZERS[name][0]
    strs = gen_strings(name, tok, N_STRINGS, 1)
    for flags, add in (((), True), (("--no-special",), False)):
        ours = run_jsonl(tok_bin, model, strs, *flags)
        ref = [e.ids for e in tok.encode_batch(strs, add_special_tokens=add)]
        assert ours == ref, first_diff(ours, ref, strs)


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_encode_special_as_text(tok_bin, shared, name):
    tok = hf_tokenizer(shared, name)
    model = shared / TOKENIZERS[name][0]
    strs = gen_strings(name, tok, 2000, 2)
    ours = run_jsonl(tok_bin, model, strs, "--no-parse-special")
    tok.encode_special_tokens = True
    ref = [e.ids for e in tok.encode_batch(strs)]
    assert ours == ref, first_diff(ours, ref, strs)


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_encode_invalid_utf8(tok_bin, shared, name):
    """Raw bytes: HF sees Python's errors='replace' decoding (one U+FFFD per maximal subpart)."""
    tok = hf_tokenizer(shared, name)
    model = shared / TOKENIZERS[name][0]
    rng = random.Random(f"bytes-{name}")
    raw = [tok_gen.random_bytes(rng, specials_of(tok)) for _ in range(2000)]
    ours = run_jsonl(tok_bin, model, [list(b) for b in raw])
    ref = [e.ids for e in tok.encode_batch([b.decode("utf-8", "replace") for b in raw])]
    assert ours == ref, first_diff(ours, ref, raw)


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_decode_random_ids(tok_bin, shared, name):
    tok = hf_tokenizer(shared, name)
    model = shared / TOKENIZERS[name][0]
    vocab = tok.get_vocab_size(with_added_tokens=True)
    special = [i for i, t in tok.get_added_tokens_decoder().items() if t.special]
    rng = random.Random(f"ids-{name}")
    seqs = []
    for _ in range(3000):
        seq = [rng.randrange(vocab) for _ in range(rng.randint(0, 30))]
        for _ in range(rng.randint(0, 3)):
            seq.insert(rng.randint(0, len(seq)), rng.choice(special))
        if rng.random() < 0.05:
            seq.insert(rng.randint(0, len(seq)), vocab + rng.randint(0, 1000))  # unknown id
        if name == "stories260K" and rng.random() < 0.5:  # runs of byte tokens
            seq[rng.randint(0, len(seq)):0] = [3 + rng.randrange(256) for _ in range(rng.randint(1, 4))]
        seqs.append(seq)
    for skip in (False, True):
        flags = ["--decode-jsonl"] + (["--skip-special"] if skip else [])
        ours = run_jsonl(tok_bin, model, seqs, *flags)
        ref = tok.decode_batch(seqs, skip_special_tokens=skip)
        assert ours == ref, first_diff(ours, ref, seqs)


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_roundtrip(tok_bin, shared, name):
    """decode(encode(s)): byte-level gives s back (NFC'd for Qwen); SentencePiece as HF does."""
    tok = hf_tokenizer(shared, name)
    _, nfc, byte_level = TOKENIZERS[name]
    model = shared / TOKENIZERS[name][0]
    strs = gen_strings(name, tok, 2000, 3)
    ids = run_jsonl(tok_bin, model, strs, "--no-special")
    back = run_jsonl(tok_bin, model, ids, "--decode-jsonl")
    for s, i, b in zip(strs, ids, back):
        if byte_level:
            assert b == (tok.normalizer.normalize_str(s) if nfc else s), (s, i, b)
        else:
            assert b == tok.decode(tok.encode(s, add_special_tokens=False).ids,
                                   skip_special_tokens=False), (s, i, b)


@pytest.mark.parametrize("vocab,name", [("qwen2", "qwen3"), ("llama-bpe", "llama3")])
@pytest.mark.parametrize("rev", ["", ".sep2025"])
def test_llama_cpp_vectors(tok_bin, shared, vocab, name, rev):
    base = shared / "tokenizers" / "test-vectors" / f"ggml-vocab-{vocab}.gguf"
    texts = (base.parent / (base.name + ".inp" + rev)).read_text(encoding="utf-8")
    texts = texts.split("\n__ggml_vocab_test__\n")[:-1]
    want = [[int(x) for x in line.split()] for line in
            (base.parent / (base.name + ".out" + rev)).read_text(encoding="utf-8").split("\n")]
    assert len(texts) == 46
    ours = run_jsonl(tok_bin, shared / TOKENIZERS[name][0], texts, "--no-special")
    assert ours == want[: len(texts)], first_diff(ours, want, texts)


def test_cli_text_and_decode(tok_bin, shared):
    model = shared / "models" / "stories260K-hf"
    tok = hf_tokenizer(shared, "stories260K")
    text = "Once upon a time<s> there</s>"
    r = subprocess.run([tok_bin, "tokenize", str(model), "--text", text], capture_output=True,
                       text=True, check=True)
    ids = json.loads(r.stdout)
    assert ids == tok.encode(text).ids
    r = subprocess.run([tok_bin, "tokenize", str(model), "--text", text, "--no-special"],
                       capture_output=True, text=True, check=True)
    assert json.loads(r.stdout) == tok.encode(text, add_special_tokens=False).ids
    r = subprocess.run([tok_bin, "tokenize", str(model), "--decode", ",".join(map(str, ids))],
                       capture_output=True, text=True, check=True)
    assert r.stdout == tok.decode(ids, skip_special_tokens=False) + "\n"


def test_cli_errors(tok_bin, tmp_path):
    r = subprocess.run([tok_bin, "tokenize", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--jsonl" in r.stdout
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": {"a": 0}, ')
    r = subprocess.run([tok_bin, "tokenize", str(tmp_path), "--text", "a"], capture_output=True,
                       text=True)
    assert r.returncode == 1
    assert "tokenizer.json" in r.stderr and "invalid JSON" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([tok_bin, "tokenize", str(tmp_path / "nope.gguf"), "--text", "a"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "nope.gguf" in r.stderr
