"""Prompt logprobs of `tessera serve` (vLLM's `prompt_logprobs` and completions' echo with
logprobs) on stories260K, checked against a float64 numpy forward of the HF checkpoint and against
the server's own sampled-token logprobs on every prefix; chunked prefill, prefix caching, n > 1,
streaming, the mp executor and the error paths."""
import json
import math
import socket
import time

import numpy as np
import openai
import pytest
from safetensors.numpy import load_file

from dist_helpers import RNG, WORDS, Serve

TOL = 1e-4
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


class Server(Serve):
    def __init__(self, exe, model, *args):
        super().__init__(exe, model, *args)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none",
                                    max_retries=0, timeout=120)

    def post(self, path, body):
        status, payload = self.request("POST", path, body)
        return status, json.loads(payload)

    def ids(self, text):
        status, r = self.post("/tokenize", {"prompt": text})
        assert status == 200, r
        return r["tokens"]

    def stop(self):
        self.proc.terminate()
        assert self.proc.wait(timeout=20) == 0, self.text()


@pytest.fixture(scope="module")
def model(shared):
    return shared / "models" / "stories260K-hf"


@pytest.fixture(scope="module")
def server(tessera, model, tmp_path_factory):
    tmpl = tmp_path_factory.mktemp("tmpl") / "chat.jinja"
    tmpl.write_text(CHAT_TEMPLATE)
    # Few sequences: the logits buffer grows to 64 rows for prompt logprobs, so prompts longer
    # than 64 tokens are chunked by rows even though the step's token budget holds them.
    s = Server(tessera, model, "--max-num-seqs", 4, "--no-enable-prefix-caching",
               "--chat-template", tmpl)
    yield s
    s.stop()


# ---- reference ----------------------------------------------------------------------------


class Reference:
    """float64 forward of the Llama checkpoint: log-softmax of every position's logits."""

    def __init__(self, model):
        self.cfg = json.loads((model / "config.json").read_text())
        self.w = {k: v.astype(np.float64) for k, v in load_file(model / "model.safetensors").items()}

    def _norm(self, x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.cfg["rms_norm_eps"]) * w

    def logprobs(self, ids):
        c, w = self.cfg, self.w
        nh, nkv = c["num_attention_heads"], c["num_key_value_heads"]
        hd = c.get("head_dim") or c["hidden_size"] // nh
        T = len(ids)
        x = w["model.embed_tokens.weight"][ids]
        inv = 1.0 / c["rope_theta"] ** (np.arange(0, hd, 2) / hd)
        ang = np.arange(T)[:, None] * inv[None, :]
        cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

        def rope(t):  # [T][heads][hd], rotate-half layout as HF Llama stores q and k
            half = np.concatenate([-t[..., hd // 2:], t[..., :hd // 2]], -1)
            return t * cos[:, None, :] + half * sin[:, None, :]

        mask = np.triu(np.full((T, T), -np.inf), 1)
        for layer in range(c["num_hidden_layers"]):
            p = f"model.layers.{layer}."
            h = self._norm(x, w[p + "input_layernorm.weight"])
            q = rope((h @ w[p + "self_attn.q_proj.weight"].T).reshape(T, nh, hd))
            k = rope((h @ w[p + "self_attn.k_proj.weight"].T).reshape(T, nkv, hd))
            v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(T, nkv, hd)
            k, v = np.repeat(k, nh // nkv, 1), np.repeat(v, nh // nkv, 1)
            s = np.einsum("thd,shd->hts", q, k) / math.sqrt(hd) + mask
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            att = np.einsum("hts,shd->thd", s, v).reshape(T, nh * hd)
            x = x + att @ w[p + "self_attn.o_proj.weight"].T
            h = self._norm(x, w[p + "post_attention_layernorm.weight"])
            g = h @ w[p + "mlp.gate_proj.weight"].T
            x = x + (g / (1 + np.exp(-g)) * (h @ w[p + "mlp.up_proj.weight"].T)) @ \
                w[p + "mlp.down_proj.weight"].T
        x = self._norm(x, w["model.norm.weight"])
        logits = x @ w.get("lm_head.weight", w["model.embed_tokens.weight"]).T
        m = logits.max(-1, keepdims=True)
        return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def ref(model):
    return Reference(model)


def rand_text(n_words):
    return " ".join(RNG.choice(WORDS) for _ in range(n_words))


def check_plp(plp, ids, lp, k):
    """vLLM's prompt_logprobs list against the reference log-softmax lp [len(ids)][vocab]."""
    assert len(plp) == len(ids) and plp[0] is None
    for i in range(1, len(ids)):
        row, entry = lp[i - 1], plp[i]
        own = entry[str(ids[i])]
        assert abs(own["logprob"] - row[ids[i]]) < TOL, (i, own, row[ids[i]])
        # Rank: tokens at least as likely (a float32 near-tie may fall either way).
        lo = int((row > row[ids[i]] + TOL).sum()) + 1
        hi = int((row >= row[ids[i]] - TOL).sum())
        assert lo <= own["rank"] <= hi, (i, own, lo, hi)
        assert isinstance(own["decoded_token"], str)
        # The top k ranked 1..k, plus the prompt token when it is not among them.
        assert len(entry) == k + (own["rank"] > k), (i, entry)
        desc = np.sort(row)[::-1]
        tops = sorted((e["rank"], int(t), e) for t, e in entry.items() if e["rank"] <= k)
        for j, (rank, t, e) in enumerate(tops):
            assert rank == j + 1 or t == ids[i], (i, entry)
            assert abs(e["logprob"] - row[t]) < TOL and abs(e["logprob"] - desc[j]) < TOL


def completion(server, prompt, **kw):
    kw.setdefault("temperature", 0)
    return server.client.completions.create(model="tiny", prompt=prompt, **kw)


# ---- values -------------------------------------------------------------------------------


def test_echo_logprobs_match_reference(server, ref):
    ids = server.ids(rand_text(RNG.randint(6, 20)))
    k, gen = RNG.randint(0, 6), RNG.randint(1, 4)
    r = completion(server, [ids], max_tokens=gen, echo=True, logprobs=k,
                   extra_body={"ignore_eos": True})
    ch = r.choices[0]
    lp = ref.logprobs(ids)
    n = len(ids)
    L = ch.logprobs
    assert len(L.tokens) == len(L.token_logprobs) == len(L.top_logprobs) == len(L.text_offset) \
        == n + gen
    assert L.token_logprobs[0] is None and L.top_logprobs[0] is None
    for i in range(1, n):
        assert abs(L.token_logprobs[i] - lp[i - 1][ids[i]]) < TOL, i
        top = L.top_logprobs[i]
        assert L.tokens[i] in top and abs(top[L.tokens[i]] - L.token_logprobs[i]) < 1e-6
        assert len(top) in (k, k + 1)
        want = np.sort(lp[i - 1])[::-1][:k]
        got = sorted((v for t, v in top.items()), reverse=True)
        # The prompt token is shown beside the top k: drop it when it is not one of them.
        if len(top) == k + 1:
            got.remove(top[L.tokens[i]])
        assert np.allclose(got, want, atol=TOL), (i, got, want)
    assert all(b >= a for a, b in zip(L.text_offset, L.text_offset[1:])) and L.text_offset[0] == 0
    # The generated tail is what the same request without echo reports.
    plain = completion(server, [ids], max_tokens=gen, logprobs=k, extra_body={"ignore_eos": True})
    assert L.tokens[n:] == plain.choices[0].logprobs.tokens
    assert np.allclose(L.token_logprobs[n:], plain.choices[0].logprobs.token_logprobs, atol=1e-6)
    assert plain.choices[0].model_extra.get("prompt_logprobs") is None
    # vLLM returns the prompt logprobs of an echo in prompt_logprobs too.
    check_plp(ch.model_extra["prompt_logprobs"], ids, lp, k)


def test_prompt_logprobs_field_matches_reference(server, ref):
    ids = server.ids(rand_text(RNG.randint(3, 12)))
    k = RNG.randint(0, 20)
    r = completion(server, [ids], max_tokens=2, extra_body={"prompt_logprobs": k})
    ch = r.choices[0]
    assert ch.logprobs is None and ch.text  # no echo: the text is the completion alone
    check_plp(ch.model_extra["prompt_logprobs"], ids, ref.logprobs(ids), k)


def test_prefix_route(server):
    """Position i's prompt logprobs are the next-token logprobs the server reports for the prefix
    ids[:i+1] (max_tokens=1, logprobs=20): an independent path through the sampler."""
    ids = server.ids(rand_text(RNG.randint(4, 8)))
    plp = completion(server, [ids], max_tokens=1,
                     extra_body={"prompt_logprobs": 20}).choices[0].model_extra["prompt_logprobs"]
    for i in range(1, len(ids)):
        r = completion(server, [ids[:i]], max_tokens=1, logprobs=20)
        top = r.choices[0].logprobs.top_logprobs[0]
        got = sorted((e["logprob"] for e in plp[i].values() if e["rank"] <= 20), reverse=True)
        assert np.allclose(got, sorted(top.values(), reverse=True)[:20], atol=TOL), i
        own = plp[i][str(ids[i])]
        if own["rank"] <= 20 and own["decoded_token"] in top:
            assert abs(top[own["decoded_token"]] - own["logprob"]) < TOL
        # The greedy token of the prefix is the rank-1 entry.
        best = [e for e in plp[i].values() if e["rank"] == 1]
        assert abs(best[0]["logprob"] - r.choices[0].logprobs.token_logprobs[0]) < TOL


def test_echo_max_tokens_zero(server, ref):
    text = rand_text(RNG.randint(3, 10))
    ids = server.ids(text)
    r = completion(server, text, max_tokens=0, echo=True, logprobs=1)
    ch = r.choices[0]
    assert ch.text == text and len(ch.logprobs.tokens) == len(ids)
    lp = ref.logprobs(ids)
    for i in range(1, len(ids)):
        assert abs(ch.logprobs.token_logprobs[i] - lp[i - 1][ids[i]]) < TOL
    assert r.usage.prompt_tokens == len(ids)
    # Without logprobs: the prompt alone, and the same in a stream.
    assert completion(server, text, max_tokens=0, echo=True).choices[0].text == text
    chunks = list(completion(server, text, max_tokens=0, echo=True, logprobs=2, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed == ch.logprobs.tokens
    assert chunks[-1].choices[0].finish_reason is not None


def test_stream_echo_logprobs(server):
    ids = server.ids(rand_text(RNG.randint(3, 10)))
    kw = dict(max_tokens=RNG.randint(1, 6), echo=True, logprobs=RNG.randint(0, 4),
              extra_body={"ignore_eos": True})
    whole = completion(server, [ids], **kw).choices[0]
    chunks = [c.choices[0] for c in completion(server, [ids], stream=True, **kw)]
    # The first chunk carries the prompt and its logprobs with the first token, as vLLM's does.
    assert len(chunks[0].logprobs.tokens) == len(ids) + 1
    assert chunks[0].logprobs.token_logprobs[0] is None
    assert "".join(c.text for c in chunks) == whole.text
    for key in ("tokens", "token_logprobs", "text_offset"):
        got = [x for c in chunks if c.logprobs for x in getattr(c.logprobs, key)]
        want = getattr(whole.logprobs, key)
        if key == "token_logprobs":
            assert got[0] is None and np.allclose(got[1:], want[1:], atol=1e-6)
        else:
            assert got == want


def test_stream_echo_n2(server):
    ids = server.ids(rand_text(RNG.randint(3, 8)))
    chunks = [c.choices[0] for c in completion(server, [ids, ids[:2]], stream=True, n=2,
                                               max_tokens=3, echo=True, logprobs=1)]
    for i in range(4):
        mine = [c for c in chunks if c.index == i]
        n = len(ids) if i < 2 else 2
        assert len(mine[0].logprobs.tokens) == n + 1 and mine[0].logprobs.token_logprobs[0] is None
        assert sum(len(c.logprobs.tokens) for c in mine if c.logprobs) == n + 3


def test_n_and_several_prompts(server, ref):
    a, b = server.ids(rand_text(5)), server.ids(rand_text(9))
    r = completion(server, [a, b], max_tokens=3, n=3, temperature=1.0,
                   extra_body={"prompt_logprobs": 2})
    assert len(r.choices) == 6
    for i, ch in enumerate(r.choices):
        ids = a if i < 3 else b
        check_plp(ch.model_extra["prompt_logprobs"], ids, ref.logprobs(ids), 2)


def test_chat_prompt_logprobs(server, ref):
    messages = [{"role": "user", "content": rand_text(6)}]
    status, tok = server.post("/tokenize", {"messages": messages})
    assert status == 200, tok
    status, r = server.post("/v1/chat/completions", {"messages": messages, "max_tokens": 2,
                                                     "prompt_logprobs": 3, "temperature": 0})
    assert status == 200, r
    # vLLM puts them beside the choices of a chat response.
    check_plp(r["prompt_logprobs"], tok["tokens"], ref.logprobs(tok["tokens"]), 3)


def test_long_prompt_chunked_by_rows(server, ref):
    """A prompt past the 64 logits rows of a step is computed in several steps."""
    ids = server.ids(rand_text(RNG.randint(60, 90)))
    assert len(ids) > 70
    r = completion(server, [ids], max_tokens=1, extra_body={"prompt_logprobs": 1})
    check_plp(r.choices[0].model_extra["prompt_logprobs"], ids, ref.logprobs(ids), 1)


# ---- the same numbers whatever the engine does ----------------------------------------------


def plp_values(srv, ids, k, **extra):
    r = completion(srv, [ids], max_tokens=2, extra_body={"prompt_logprobs": k, **extra})
    return r, r.choices[0].model_extra["prompt_logprobs"]


def same(a, b, tol=1e-5):
    assert len(a) == len(b) and a[0] is None and b[0] is None
    for x, y in zip(a[1:], b[1:]):
        assert x.keys() == y.keys()
        for t in x:
            assert abs(x[t]["logprob"] - y[t]["logprob"]) < tol and x[t]["rank"] == y[t]["rank"]


def test_chunked_prefill_and_prefix_cache(tessera, model, server):
    ids = server.ids(rand_text(RNG.randint(25, 45)))
    k = RNG.randint(1, 5)
    _, want = plp_values(server, ids, k)
    # A step of 16 tokens: the prompt is prefilled in chunks, with another request running.
    s = Server(tessera, model, "--max-num-batched-tokens", 16, "--enable-prefix-caching")
    try:
        other = server.ids(rand_text(40))
        with_other = completion(s, [other], max_tokens=20, stream=True)
        _, got = plp_values(s, ids, k)
        list(with_other)
        same(want, got)
        # The prompt is in the prefix cache now; prompt logprobs do not read it (vLLM's rule)...
        plain = completion(s, [ids], max_tokens=1)
        assert plain.usage.prompt_tokens_details.cached_tokens > 0
        r, again = plp_values(s, ids, k)
        same(want, again)
        assert r.usage.prompt_tokens_details.cached_tokens == 0
        # ...and a request without them still does.
        assert completion(s, [ids], max_tokens=1).usage.prompt_tokens_details.cached_tokens > 0
    finally:
        s.stop()


def test_mp_executor(tessera, model, server):
    """tp 2 x pp 2 worker processes: logits rows come back over the wire, micro-batches in
    flight."""
    ids = server.ids(rand_text(RNG.randint(20, 40)))
    _, want = plp_values(server, ids, 3)
    s = Server(tessera, model, "--tensor-parallel-size", 2, "--pipeline-parallel-size", 2,
               "--max-num-batched-tokens", 32)
    try:
        _, got = plp_values(s, ids, 3)
        same(want, got, tol=TOL)
        r = completion(s, [ids], max_tokens=2, echo=True, logprobs=2)
        assert r.choices[0].logprobs.token_logprobs[0] is None
    finally:
        s.stop()


def test_client_gone_mid_prompt(server):
    """A client that hangs up while its prompt logprobs are computed frees everything."""
    ids = server.ids(rand_text(110))
    body = json.dumps({"prompt": [ids] * 4, "max_tokens": 5, "n": 2, "prompt_logprobs": 20})
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", server.port)) as sk:
            sk.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                        f"application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode())
    deadline = time.time() + 30
    while True:
        status, text = server.request("GET", "/metrics")
        m = {ln.rsplit(" ", 1)[0].split("{")[0]: float(ln.rsplit(" ", 1)[1])
             for ln in text.decode().splitlines() if ln and not ln.startswith("#")}
        if (m["tessera:num_requests_running"] == 0 and m["tessera:num_requests_waiting"] == 0
                and m["tessera:http_requests_active"] == 0
                and m["tessera:kv_blocks_free"] == m["tessera:kv_blocks_total"]):
            break
        assert time.time() < deadline, m
        time.sleep(0.05)
    assert completion(server, [ids[:5]], max_tokens=1, extra_body={"prompt_logprobs": 1})


# ---- errors -------------------------------------------------------------------------------

BAD = [
    {"prompt": "a b", "prompt_logprobs": 21},
    {"prompt": "a b", "prompt_logprobs": -1},
    {"prompt": "a b", "prompt_logprobs": "3"},
    {"prompt": "a b", "prompt_logprobs": 2.5},
    {"prompt": "a b", "prompt_logprobs": 2, "stream": True},
    {"prompt": "a b", "echo": True, "logprobs": 21},
    {"prompt": "a b", "max_tokens": 0},
    {"prompt": "a b", "max_tokens": -1, "echo": True},
]


@pytest.mark.parametrize("body", BAD)
def test_bad_values(server, body):
    status, r = server.post("/v1/completions", body)
    assert status == 400 and r["error"]["message"], r


def test_bad_chat_values(server):
    m = [{"role": "user", "content": "hi"}]
    for extra in ({"prompt_logprobs": 99}, {"prompt_logprobs": 1, "stream": True}):
        status, r = server.post("/v1/chat/completions", {"messages": m, **extra})
        assert status == 400, r


def test_stream_with_zero_prompt_logprobs(server):
    # vLLM refuses only prompt_logprobs > 0 in a stream.
    chunks = list(completion(server, "a b", max_tokens=2, stream=True,
                             extra_body={"prompt_logprobs": 0}))
    assert chunks
