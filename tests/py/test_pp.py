"""Black-box tests of pipeline parallelism with micro-batches in flight across steps: many
concurrent greedy requests of different lengths through P=2 and T=2 x P=2 give exactly the texts
of one process; a client that disconnects mid-pipeline has its blocks freed; /metrics counts the
tokens of every response and /health stays 200 under load; every KV block is free afterwards."""
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from dist_helpers import RNG, Serve, rand_prompt

STORIES = "models/stories260K-hf"
ARGS = ("--max-model-len", 512, "--max-num-seqs", 64)


def metrics(s):
    status, text = s.request("GET", "/metrics")
    assert status == 200
    out = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0]] = float(value)
    return out


def wait_idle(s, timeout=30):
    deadline = time.time() + timeout
    while True:
        m = metrics(s)
        if (m["tessera:num_requests_running"] == 0 and m["tessera:num_requests_waiting"] == 0
                and m["tessera:kv_blocks_free"] == m["tessera:kv_blocks_total"]):
            return m
        assert time.time() < deadline, f"server not idle: {m}\n{s.text()}"
        time.sleep(0.05)


def completion(s, prompt, max_tokens, **extra):
    status, body = s.request("POST", "/v1/completions", {
        "model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra})
    assert status == 200, body
    return json.loads(body)


def workload(n):
    """n requests of random prompt lengths and output lengths (some stop early on EOS)."""
    return [(rand_prompt(1, 30), RNG.randint(1, 60), RNG.random() < 0.5) for _ in range(n)]


def texts(s, reqs, concurrency):
    def one(r):
        out = completion(s, r[0], r[1], ignore_eos=r[2])
        return out["choices"][0]["text"], out["usage"]
    if concurrency == 1:
        return [one(r) for r in reqs]
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, reqs))


@pytest.fixture(scope="module")
def uni_ref(tessera, shared):
    """A workload and its texts from one process, one request at a time."""
    reqs = workload(48)
    s = Serve(tessera, shared / STORIES, *ARGS)
    try:
        want = texts(s, reqs, 1)
    finally:
        s.stop()
    return reqs, want


def counts(results):
    return [(u["prompt_tokens"], u["completion_tokens"]) for _, u in results]


@pytest.mark.parametrize("tp,pp,extra", [
    (1, 2, ()), (2, 2, ()), (1, 2, ("--no-enable-prefix-caching",)),
    # A cache of about 40 blocks for 48 requests, 12 at a time: sequences wait and are preempted.
    (1, 2, ("--kv-cache-memory", "480K", "--max-num-seqs", 12))])
def test_concurrent_pipeline_matches_uni(tessera, shared, uni_ref, tp, pp, extra):
    reqs, want = uni_ref
    s = Serve(tessera, shared / STORIES, *ARGS, "--tensor-parallel-size", tp,
              "--pipeline-parallel-size", pp, *extra)
    try:
        before = metrics(s)
        got = texts(s, reqs, len(reqs))
        assert [g[0] for g in got] == [w[0] for w in want], s.text()
        assert counts(got) == counts(want)
        # A second wave meets the first's prompts in the prefix cache: still the same texts.
        again = texts(s, reqs, 16)
        assert [g[0] for g in again] == [w[0] for w in want], s.text()
        m = wait_idle(s)
        # Every token of every response is counted once.
        gen = sum(c for _, c in counts(got + again))
        prompt = sum(p for p, _ in counts(got + again))
        assert m["tessera:generation_tokens_total"] - before["tessera:generation_tokens_total"] == gen
        assert m["tessera:prompt_tokens_total"] - before["tessera:prompt_tokens_total"] == prompt
        hits = m["tessera:prefix_cache_hits_total"] - before["tessera:prefix_cache_hits_total"]
        assert hits == 0 if "--no-enable-prefix-caching" in extra else hits > 0
        if "--kv-cache-memory" in extra:
            assert m["tessera:num_preemptions_total"] > 0
        assert s.health() == 200
    finally:
        s.stop()


def test_pipeline_seeded_sampling_matches_uni(tessera, shared):
    # P stages pass float32 hidden states on unchanged, so the logits are those of one process
    # and seeded sampling (the driver's) draws the same tokens, with other streams beside it.
    prompt = rand_prompt()
    seed = RNG.randint(0, 1 << 30)
    body = {"prompt": prompt, "max_tokens": 24, "temperature": 0.9, "seed": seed, "n": 3}
    out = {}
    for name, args in (("uni", ()), ("pp2", ("--pipeline-parallel-size", 2))):
        s = Serve(tessera, shared / STORIES, *ARGS, *args)
        try:
            with ThreadPoolExecutor(6) as pool:
                others = [pool.submit(completion, s, rand_prompt(), 40, ignore_eos=True)
                          for _ in range(5)]
                status, raw = s.request("POST", "/v1/completions", {"model": "tiny", **body})
                assert status == 200, raw
                for f in others:
                    f.result()
            out[name] = [c["text"] for c in sorted(json.loads(raw)["choices"],
                                                   key=lambda c: c["index"])]
            wait_idle(s)
        finally:
            s.stop()
    assert out["pp2"] == out["uni"]
    assert len(set(out["uni"])) > 1  # the choices really sampled


def test_disconnect_mid_pipeline_frees_blocks(tessera, shared, uni_ref):
    reqs, want = uni_ref
    s = Serve(tessera, shared / STORIES, *ARGS, "--pipeline-parallel-size", 2)
    try:
        before = metrics(s)
        with ThreadPoolExecutor(16) as pool:
            # Other requests keep both micro-batches busy while the long ones are cut off.
            others = pool.submit(texts, s, reqs[:24], 12)
            cut = []
            for stream in (True, True, False):
                sock = socket.create_connection(("127.0.0.1", s.port))
                body = json.dumps({"prompt": rand_prompt(), "max_tokens": 480, "ignore_eos": True,
                                   "stream": stream, "n": 2, "temperature": 1.0})
                sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                              f"application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                              f"{body}").encode())
                if stream:  # wait for the first token's event: generation has started
                    got_bytes = b""
                    while b"data: " not in got_bytes:
                        chunk = sock.recv(4096)
                        assert chunk, got_bytes
                        got_bytes += chunk
                cut.append(sock)
            for sock in cut:
                sock.close()
            got = others.result()
        assert [g[0] for g in got] == [w[0] for w in want[:24]], s.text()
        m = wait_idle(s)
        # Without the cancels the three requests alone would generate 3 x 2 x 480 tokens.
        done = sum(g[1]["completion_tokens"] for g in got)
        cancelled = m["tessera:generation_tokens_total"] - before["tessera:generation_tokens_total"] - done
        assert 0 < cancelled < 3 * 2 * 480
        assert s.health() == 200
        # Still serving, with the right text.
        assert texts(s, reqs[24:32], 8) == want[24:32]
        wait_idle(s)
    finally:
        s.stop()


def test_health_and_metrics_under_load(tessera, shared):
    s = Serve(tessera, shared / STORIES, *ARGS, "-tp", 2, "-pp", 2)
    try:
        n = 12
        with ThreadPoolExecutor(n) as pool:
            futs = [pool.submit(completion, s, rand_prompt(), 200, ignore_eos=True)
                    for _ in range(n)]
            seen = set()
            while not all(f.done() for f in futs):
                assert s.health() == 200
                m = metrics(s)
                live = m["tessera:num_requests_running"] + m["tessera:num_requests_waiting"]
                assert 0 <= live <= n
                assert 0 <= m["tessera:kv_blocks_free"] <= m["tessera:kv_blocks_total"]
                seen.add(m["tessera:num_requests_running"])
                time.sleep(0.02)
            outs = [f.result() for f in futs]
        assert all(o["usage"]["completion_tokens"] == 200 for o in outs)
        assert max(seen) > 1  # several requests were running at once
        m = wait_idle(s)
        assert m["tessera:generation_tokens_total"] >= n * 200
        assert s.health() == 200
    finally:
        s.stop()
