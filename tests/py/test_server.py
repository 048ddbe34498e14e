"""Black-box tests of `tessera serve`: the real binary on a free port, driven by the official
`openai` client and by raw HTTP for the error paths. Every test leaves the server serving and every
KV block free (checked through /metrics)."""
import asyncio
import http.client
import json
import os
import pathlib
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from dist_helpers import RNG, WORDS, Serve

ROOT = pathlib.Path(__file__).resolve().parents[2]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def rand_text(n_words):
    return " ".join(RNG.choice(WORDS) for _ in range(n_words))


class Server(Serve):
    """One `tessera serve` process on a port the server picked itself (--port 0), with an
    `openai` client pointed at it."""

    def __init__(self, exe, model, *args):
        super().__init__(exe, model, *args)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none",
                                    max_retries=0, timeout=60)

    def request(self, method, path, body=None, headers=None, raw=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        data = raw if raw is not None else (json.dumps(body) if body is not None else None)
        conn.request(method, path, body=data, headers={"Content-Type": "application/json",
                                                       **(headers or {})})
        r = conn.getresponse()
        payload = r.read()
        conn.close()
        return r.status, payload

    def metrics(self):
        status, text = self.request("GET", "/metrics")
        assert status == 200
        out = {}
        for line in text.decode().splitlines():
            if line.startswith("#") or not line:
                continue
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
            out.setdefault(name.split("{")[0], float(value))
        return out

    def wait_idle(self):
        """Polls until no request is running or waiting and every KV block is free."""
        deadline = time.time() + 30
        while True:
            m = self.metrics()
            if (m["tessera:num_requests_running"] == 0 and m["tessera:num_requests_waiting"] == 0
                    and m["tessera:http_requests_active"] == 0
                    and m["tessera:kv_blocks_free"] == m["tessera:kv_blocks_total"]):
                return m
            assert time.time() < deadline, f"server not idle: {m}"
            time.sleep(0.05)

    def rss_kb(self):
        for line in open(f"/proc/{self.proc.pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def alive(self):
        status, _ = self.request("GET", "/health")
        assert status == 200 and self.proc.poll() is None

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        assert rc == 0, "".join(self.log[-20:])


@pytest.fixture(scope="session")
def exe(tessera):
    return os.environ.get("TESSERA_BIN", tessera)


@pytest.fixture(scope="module")
def stories(shared):
    return shared / "models" / "stories260K-hf"


@pytest.fixture(scope="module")
def server(exe, stories, tmp_path_factory):
    tmpl = tmp_path_factory.mktemp("tmpl") / "chat.jinja"
    tmpl.write_text(CHAT_TEMPLATE)
    s = Server(exe, stories, "--chat-template", str(tmpl), "--max-num-seqs", "64")
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def idle_after(request):
    yield
    if "server" in request.fixturenames:
        request.getfixturevalue("server").wait_idle()


def greedy(server, prompt, max_tokens=12, **kw):
    r = server.client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens,
                                         temperature=0, **kw)
    return r


# ---- basic shapes -------------------------------------------------------------------------


def test_models_health_version(server):
    models = server.client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert models.data[0].object == "model"
    assert server.request("GET", "/health")[0] == 200
    status, body = server.request("GET", "/version")
    assert status == 200 and "version" in json.loads(body)


def test_completion_shape_and_usage(server):
    prompt = rand_text(6)
    r = greedy(server, prompt, max_tokens=10)
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == "tiny"
    assert len(r.choices) == 1 and r.choices[0].index == 0
    assert r.choices[0].finish_reason in ("stop", "length")
    n_prompt = len(tokenize(server, prompt))
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert 1 <= r.usage.completion_tokens <= 10
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 10
    assert r.usage.prompt_tokens_details.cached_tokens >= 0


def tokenize(server, text, **kw):
    status, body = server.request("POST", "/tokenize", {"prompt": text, **kw})
    assert status == 200, body
    out = json.loads(body)
    assert out["count"] == len(out["tokens"])
    return out["tokens"]


def test_tokenize_detokenize_roundtrip(server):
    text = rand_text(RNG.randint(1, 30))
    ids = tokenize(server, text, add_special_tokens=False)
    status, body = server.request("POST", "/detokenize", {"tokens": ids})
    assert status == 200
    assert json.loads(body)["prompt"].strip() == text


def test_stream_equals_non_stream(server):
    prompt = rand_text(5)
    full = greedy(server, prompt, max_tokens=16)
    chunks = list(server.client.completions.create(
        model="tiny", prompt=prompt, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == full.choices[0].finish_reason and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        full.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_n_and_seed_reproducible(server):
    prompt = rand_text(4)
    seed = RNG.randint(0, 2**31)
    kw = dict(model="tiny", prompt=prompt, max_tokens=12, temperature=1.0, n=3, seed=seed)
    a = server.client.completions.create(**kw)
    b = server.client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert 3 <= a.usage.completion_tokens <= 36
    # Different seeds should not all give the same three texts (temperature 1 over 12 tokens).
    others = [server.client.completions.create(**dict(kw, seed=seed + k)).choices[0].text
              for k in range(1, 4)]
    assert len(set(others + [a.choices[0].text])) > 1


def test_stop_string(server):
    prompt = rand_text(5)
    base = greedy(server, prompt, max_tokens=24).choices[0].text
    words = [w for w in base.split() if len(w) > 2]
    if not words:
        pytest.skip("greedy output has no word to stop on")
    stop = RNG.choice(words)
    r = greedy(server, prompt, max_tokens=24, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == base[:base.index(stop)]
    r2 = greedy(server, prompt, max_tokens=24, stop=stop,
                extra_body={"include_stop_str_in_output": True})
    assert r2.choices[0].text == base[:base.index(stop) + len(stop)]


def test_logprobs_completion(server):
    k = RNG.randint(1, 5)
    r = greedy(server, rand_text(4), max_tokens=8, logprobs=k)
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n
    # lstrip: whether the first token's leading space shows is the detokenizer's business.
    assert "".join(lp.tokens).lstrip() == r.choices[0].text.lstrip()
    for tok, val, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert val <= 0 and tok in top and len(top) <= k + 1
        # Greedy: the sampled token is the most likely one.
        assert val >= max(top.values()) - 1e-5
    assert lp.text_offset == sorted(lp.text_offset)


def test_prompt_forms(server):
    texts = [rand_text(RNG.randint(2, 8)) for _ in range(3)]
    by_text = [greedy(server, t, max_tokens=6).choices[0].text for t in texts]
    ids = [tokenize(server, t) for t in texts]
    r = server.client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    assert [c.text for c in r.choices] == by_text
    r = server.client.completions.create(model="tiny", prompt=texts, max_tokens=6, temperature=0,
                                         n=2)
    assert [c.index for c in r.choices] == list(range(6))
    assert [c.text for c in r.choices] == [t for t in by_text for _ in range(2)]
    assert r.usage.prompt_tokens == sum(len(i) for i in ids)
    single = server.client.completions.create(model="tiny", prompt=ids[0], max_tokens=6,
                                              temperature=0)
    assert single.choices[0].text == by_text[0]


def test_echo(server):
    prompt = rand_text(4)
    r = greedy(server, prompt, max_tokens=5, echo=True)
    plain = greedy(server, prompt, max_tokens=5)
    assert r.choices[0].text == prompt + plain.choices[0].text


def test_vllm_extras(server):
    prompt = rand_text(4)
    r = greedy(server, prompt, max_tokens=7,
               extra_body={"ignore_eos": True, "min_tokens": 7, "top_k": 5, "min_p": 0.01,
                           "repetition_penalty": 1.1, "some_unknown_field": [1, 2]})
    assert r.usage.completion_tokens == 7 and r.choices[0].finish_reason == "length"


# ---- chat ----------------------------------------------------------------------------------


def test_chat_and_stream(server):
    msgs = [{"role": "system", "content": rand_text(3)},
            {"role": "user", "content": [{"type": "text", "text": rand_text(4)}]}]
    r = server.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10,
                                              temperature=0)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    chunks = list(server.client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens
    # The rendered prompt is exactly what /tokenize renders for the same messages.
    status, body = server.request("POST", "/tokenize", {"messages": msgs})
    assert status == 200 and json.loads(body)["count"] == r.usage.prompt_tokens


def test_chat_logprobs(server):
    r = server.client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": rand_text(3)}], max_tokens=5,
        temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) <= 2
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token


def test_chat_without_template_is_400(exe, stories):
    s = Server(exe, stories)
    try:
        status, body = s.request("POST", "/v1/chat/completions",
                                 {"messages": [{"role": "user", "content": "hi"}]})
        assert status == 400
        assert "chat template" in json.loads(body)["error"]["message"]
        s.alive()
    finally:
        s.stop()


# ---- errors --------------------------------------------------------------------------------


ERRORS = [
    ("POST", "/v1/completions", "{not json", 400),
    ("POST", "/v1/completions", "[1, 2]", 400),
    ("POST", "/v1/completions", {"max_tokens": 3}, 400),
    ("POST", "/v1/completions", {"prompt": 5}, 400),
    ("POST", "/v1/completions", {"prompt": "a", "max_tokens": "many"}, 400),
    ("POST", "/v1/completions", {"prompt": "a", "temperature": -1}, 400),
    ("POST", "/v1/completions", {"prompt": "a", "temperature": "hot"}, 400),
    ("POST", "/v1/completions", {"prompt": "a", "top_p": 0}, 400),
    ("POST", "/v1/completions", {"prompt": "a", "n": 0}, 400),
    ("POST", "/v1/completions", {"prompt": "a", "max_tokens": 0}, 400),
    ("POST", "/v1/completions", {"prompt": "a", "logprobs": 99}, 400),
    ("POST", "/v1/completions", {"prompt": [1, 99999]}, 400),
    ("POST", "/v1/completions", {"prompt": []}, 400),
    ("POST", "/v1/completions", {"prompt": "a", "stop": 3}, 400),
    ("POST", "/v1/completions", {"prompt": "a", "logit_bias": {"x": 1}}, 400),
    ("POST", "/v1/completions", {"prompt": "a", "stream_options": {"include_usage": True}}, 400),
    ("POST", "/v1/completions", {"prompt": "a", "presence_penalty": 3}, 400),
    ("POST", "/v1/completions", {"prompt": "a", "max_tokens": 100000}, 400),
    ("POST", "/v1/completions", {"prompt": "a", "model": "nope"}, 404),
    ("POST", "/v1/chat/completions", {"messages": "hi"}, 400),
    ("POST", "/v1/chat/completions", {"messages": [{"content": "no role"}]}, 400),
    ("POST", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400),
    ("POST", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400),
    ("GET", "/v1/completions", None, 405),
    ("POST", "/v1/models", {}, 405),
    ("GET", "/v1/nothing", None, 404),
    ("POST", "/detokenize", {"tokens": [-1]}, 400),
]


@pytest.mark.parametrize("method,path,body,status", ERRORS)
def test_errors(server, method, path, body, status):
    raw = body if isinstance(body, str) else None
    got, payload = server.request(method, path, None if raw else body, raw=raw)
    assert got == status, payload
    err = json.loads(payload)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["code"] == status
    server.alive()


def test_prompt_longer_than_context(server):
    n = 0
    text = ""
    while n < 600:
        text += " " + rand_text(50)
        n = len(tokenize(server, text))
    status, payload = server.request("POST", "/v1/completions", {"prompt": text, "max_tokens": 1})
    assert status == 400 and "context length" in json.loads(payload)["error"]["message"]
    status, payload = server.request("POST", "/v1/completions",
                                     {"prompt": rand_text(5), "max_tokens": 510})
    assert status == 400
    server.alive()


def test_huge_body_is_413(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(64 << 20))
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413
    conn.close()
    server.alive()


def test_openai_client_raises_on_errors(server):
    with pytest.raises(openai.NotFoundError):
        server.client.completions.create(model="other", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        server.client.completions.create(model="tiny", prompt="x", max_tokens=2, temperature=-2)


def test_api_key(exe, stories):
    key = "k%08x" % RNG.getrandbits(32)
    s = Server(exe, stories, "--api-key", key)
    try:
        body = {"prompt": "once", "max_tokens": 2}
        assert s.request("POST", "/v1/completions", body)[0] == 401
        assert s.request("POST", "/v1/completions", body,
                         headers={"Authorization": "Bearer wrong"})[0] == 401
        assert s.request("GET", "/v1/models")[0] == 401
        assert s.request("POST", "/v1/completions", body,
                         headers={"Authorization": f"Bearer {key}"})[0] == 200
        assert s.request("GET", "/health")[0] == 200
        ok = openai.OpenAI(base_url=f"http://127.0.0.1:{s.port}/v1", api_key=key)
        assert ok.completions.create(model="tiny", prompt="a", max_tokens=2).choices
    finally:
        s.stop()


# ---- concurrency, caching, cancellation, load ---------------------------------------------


def test_concurrent_equals_sequential(server):
    prompts = [rand_text(RNG.randint(2, 12)) for _ in range(64)]
    seq = [greedy(server, p, max_tokens=8).choices[0].text for p in prompts]
    with ThreadPoolExecutor(64) as pool:
        par = list(pool.map(lambda p: greedy(server, p, max_tokens=8).choices[0].text, prompts))
    assert par == seq


def test_prefix_caching_on_off_equal(server, exe, stories):
    shared_prefix = rand_text(40)
    prompts = [shared_prefix + " " + rand_text(RNG.randint(1, 6)) for _ in range(6)]
    on = [greedy(server, p, max_tokens=8) for p in prompts]
    assert sum(r.usage.prompt_tokens_details.cached_tokens for r in on[1:]) > 0
    before = server.metrics()["tessera:prefix_cache_hits_total"]
    greedy(server, prompts[0], max_tokens=8)
    assert server.metrics()["tessera:prefix_cache_hits_total"] > before
    s = Server(exe, stories, "--no-enable-prefix-caching")
    try:
        off = [greedy(s, p, max_tokens=8) for p in prompts]
        assert all(r.usage.prompt_tokens_details.cached_tokens == 0 for r in off)
        s.wait_idle()
    finally:
        s.stop()
    assert [r.choices[0].text for r in on] == [r.choices[0].text for r in off]


def test_disconnect_cancels(server):
    before = server.metrics()["tessera:generation_tokens_total"]
    for stream in (True, False):
        sock = socket.create_connection(("127.0.0.1", server.port))
        body = json.dumps({"prompt": rand_text(3), "max_tokens": 500, "ignore_eos": True,
                           "stream": stream, "n": 4, "temperature": 1.0})
        sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                      f"application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode())
        if stream:
            assert sock.recv(100)  # generation has started
        sock.close()
    m = server.wait_idle()
    # Without cancellation both requests would run to 4 x 500 tokens each.
    assert m["tessera:generation_tokens_total"] - before < 2 * 4 * 500
    server.alive()


async def _one(port, i, stream):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps({"prompt": f"once upon a time {i % 7}", "max_tokens": 3,
                       "temperature": 0, "stream": stream})
    writer.write((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                  f"{body}").encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, payload = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), data[:200]
    if stream:
        assert b"data: [DONE]" in payload
    else:
        assert b'"finish_reason"' in payload
    return 1


def _load(port, total, streaming):
    async def main():
        tasks = [_one(port, i, i < streaming) for i in range(total)]
        return await asyncio.gather(*tasks)
    return sum(asyncio.run(main()))


def test_load_1000_connections(server):
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    assert _load(server.port, 1000, 200) == 1000
    server.wait_idle()
    rss1 = server.rss_kb()
    assert _load(server.port, 1000, 200) == 1000
    server.wait_idle()
    rss2 = server.rss_kb()
    # A second identical wave must not grow the server by more than a few MB.
    assert rss2 - rss1 < 64 * 1024, (rss1, rss2)
    server.alive()


@pytest.mark.parametrize("flags,needle", [
    (["--tensor-parallel-size", "0"], "tensor-parallel-size"),
    (["--pipeline-parallel-size=0"], "pipeline-parallel-size"),
    (["--distributed-executor-backend", "foo"], "distributed-executor-backend"),
    (["--port", "70000"], "--port"),
    (["--frobnicate", "1"], "unknown option"),
])
def test_serve_rejects_bad_flags(exe, stories, flags, needle):
    r = subprocess.run([exe, "serve", str(stories), *flags], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2 and needle in r.stderr


@pytest.mark.parametrize("flags,needle", [
    (["--tensor-parallel-size", "3"], "must divide the attention heads (8) and key/value heads (4)"),
    (["--pipeline-parallel-size", "9"], "pipeline-parallel size 9 exceeds the 5 layers"),
])
def test_serve_rejects_impossible_layouts(exe, stories, flags, needle):
    r = subprocess.run([exe, "serve", str(stories), "--port", "0", *flags], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 1 and needle in r.stderr
