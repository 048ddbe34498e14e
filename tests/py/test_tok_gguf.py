"""GGUF "gpt2" vocabularies: the Qwen3 and Llama 3 tokenizer.json files written into GGUF metadata
(as llama.cpp's converter does: tokens, merges, token types, tokenizer.ggml.pre) must encode
generated strings exactly as Hugging Face `tokenizers` does from the JSON."""
import json
import random
import sys

import pytest

from test_tok_parity import ROOT, TOKENIZERS, first_diff, run_jsonl, specials_of  # noqa: F401

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")
sys.path.insert(0, str(ROOT / "tools"))
import tok_gen  # noqa: E402


@pytest.fixture(scope="session")
def tok_bin(tessera):
    import os
    return os.environ.get("TESSERA_BIN", tessera)


def write_gguf(path, tok_json, pre, add_bos, bos_id):
    d = json.loads(tok_json.read_text(encoding="utf-8"))
    vocab = d["model"]["vocab"]
    added = {a["id"]: a for a in d["added_tokens"]}
    n = max(max(vocab.values()), max(added)) + 1
    tokens = [""] * n
    for s, i in vocab.items():
        tokens[i] = s
    types = [1] * n
    for i, a in added.items():
        tokens[i] = a["content"]
        types[i] = 3 if a["special"] else 4
    merges = [m if isinstance(m, str) else " ".join(m) for m in d["model"]["merges"]]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_add_bos_token(add_bos)
    if bos_id is not None:
        w.add_bos_token_id(bos_id)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("name,pre,add_bos,bos_id",
                         [("qwen3", "qwen2", False, None), ("llama3", "llama-bpe", True, 128000)])
def test_gguf_gpt2_vocab(tok_bin, shared, tmp_path, name, pre, add_bos, bos_id):
    src = shared / TOKENIZERS[name][0] / "tokenizer.json"
    path = tmp_path / f"{name}.gguf"
    write_gguf(path, src, pre, add_bos, bos_id)
    tok = tokenizers.Tokenizer.from_file(str(src))
    rng = random.Random(f"gguf-{name}")
    strs = [tok_gen.random_text(rng, specials_of(tok)) for _ in range(3000)]
    ours = run_jsonl(tok_bin, path, strs)
    ref = [e.ids for e in tok.encode_batch(strs, add_special_tokens=True)]
    assert ours == ref, first_diff(ours, ref, strs)
    ids = [rng.sample(range(tok.get_vocab_size()), 20) for _ in range(500)]
    assert run_jsonl(tok_bin, path, ids, "--decode-jsonl") == tok.decode_batch(
        ids, skip_special_tokens=False)
