"""Black-box tests of `tessera serve --distributed-executor-backend mp`: tensor-parallel,
pipeline-parallel and combined layouts give the same greedy texts as one process (uni) on
stories260K and on random tiny Qwen3 and Llama checkpoints (HF and GGUF); the OpenAI API over T=2 x P=2
(streaming and not); the layout and worker log lines; settable layer splits; clear start-up errors
for layouts the model cannot take."""
import json
import re
import subprocess

import openai
import pytest

from dist_helpers import RNG, Serve, rand_prompt, read_sse

MAX_TOKENS = 24
_uni_cache = {}


def model_path(name, shared, checkpoints):
    if name == "stories260K":
        return shared / "models" / "stories260K-hf"
    if name.endswith(".gguf"):
        return checkpoints[name[:-5]]["gguf"]
    return checkpoints[name]["hf"]


def greedy_texts(tessera, model, prompts, *args):
    s = Serve(tessera, model, "--max-model-len", 256, *args)
    try:
        return s.complete(prompts, MAX_TOKENS, ignore_eos=True), s.text()
    finally:
        s.stop()


@pytest.mark.parametrize("name,tp,pp", [
    ("stories260K", 2, 1), ("stories260K", 1, 2), ("stories260K", 2, 2),
    ("tiny-qwen3", 2, 2), ("tiny-llama", 2, 2), ("tiny-qwen3", 2, 1), ("tiny-llama.gguf", 2, 2)])
def test_mp_matches_uni(tessera, shared, checkpoints, name, tp, pp):
    model = model_path(name, shared, checkpoints)
    if name not in _uni_cache:
        prompts = [rand_prompt() for _ in range(5)]
        _uni_cache[name] = (prompts, greedy_texts(tessera, model, prompts)[0])
    prompts, want = _uni_cache[name]
    got, log = greedy_texts(tessera, model, prompts, "--distributed-executor-backend", "mp",
                            "--tensor-parallel-size", tp, "--pipeline-parallel-size", pp)
    assert got == want, log
    # One line per worker (rank, node, unit, device) and the driver's layout, rank by rank.
    for r in range(tp * pp):
        assert re.search(rf"worker rank {r} \(tp {r % tp}/{tp}, pp {r // tp}/{pp}\) on node "
                         rf"127\.0\.0\.1, unit {r}, device cpu", log), log
        assert re.search(rf"mp executor: rank {r} -> node 127\.0\.0\.1, unit {r}, device cpu, "
                         rf"stage {r // tp} layers", log), log


def test_openai_api_tp2_pp2(tessera, shared):
    model = shared / "models" / "stories260K-hf"
    s = Serve(tessera, model, "--tensor-parallel-size", 2, "--pipeline-parallel-size", 2)
    try:
        assert "mp executor: 4 workers (tp 2 x pp 2)" in s.text()  # mp is the default for T x P > 1
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{s.port}/v1", api_key="none",
                               max_retries=0, timeout=60)
        prompt = rand_prompt()
        full = client.completions.create(model="tiny", prompt=prompt, max_tokens=32,
                                         temperature=0)
        pieces = [c.choices[0].text for c in client.completions.create(
            model="tiny", prompt=prompt, max_tokens=32, temperature=0, stream=True)]
        assert "".join(pieces) == full.choices[0].text and len(pieces) > 1
        assert full.usage.completion_tokens <= 32
        # Seeded sampling is the driver's: the same seed gives the same text twice, n > 1 works.
        seed = RNG.randint(0, 1 << 30)
        a = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, seed=seed,
                                      temperature=1.0, n=3)
        b = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, seed=seed,
                                      temperature=1.0, n=3)
        assert [c.text for c in a.choices] == [c.text for c in b.choices]
        # Concurrent streams through the pipeline.
        conns = [s.stream_open(rand_prompt(), 20, ignore_eos=True) for _ in range(4)]
        for conn, resp in conns:
            chunks = [json.loads(d) for d in read_sse(resp)]
            assert all("error" not in c for c in chunks)
            assert sum(len(c["choices"]) for c in chunks) >= 20
            conn.close()
        assert s.health() == 200
    finally:
        s.stop()


def test_pipeline_layer_split(tessera, shared):
    model = shared / "models" / "stories260K-hf"
    prompts = [rand_prompt() for _ in range(3)]
    want, _ = greedy_texts(tessera, model, prompts)
    for split, ranges in (("4,1", ["[0, 4)", "[4, 5)"]), ("1,2,2", ["[0, 1)", "[1, 3)", "[3, 5)"])):
        got, log = greedy_texts(tessera, model, prompts, "--pipeline-parallel-size",
                                len(ranges), "--pipeline-layer-split", split)
        assert got == want, log
        for stage, rng in enumerate(ranges):
            assert f"stage {stage} layers {rng}" in log, log


@pytest.mark.parametrize("args,message", [
    (["-tp", "3"], "tensor-parallel size 3 must divide the attention heads (8) and key/value "
                   "heads (4)"),
    (["-pp", "2", "--pipeline-layer-split", "2,2"], "--pipeline-layer-split '2,2' gives 2 stages "
                                                    "and 4 layers"),
    (["-pp", "6"], "pipeline-parallel size 6 exceeds the 5 layers"),
    (["-tp", "2", "--distributed-executor-backend", "uni"], "needs worker processes"),
    (["--distributed-executor-backend", "threads"], "expects uni, mp or ray"),
])
def test_bad_layout_fails_at_start(tessera, shared, args, message):
    model = shared / "models" / "stories260K-hf"
    p = subprocess.run([tessera, "serve", str(model), "--port", "0", *args], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode != 0
    assert message in p.stderr, p.stderr
    assert "worker rank" not in p.stderr  # refused before any worker started
