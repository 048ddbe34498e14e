"""Chat completions on a random tiny Qwen3 checkpoint with the real Qwen3 tokenizer and chat
template: the prompt the server builds is checked against Python jinja2 + Hugging Face tokenizers
(as transformers' apply_chat_template renders it), then generation is driven through `openai`."""
import json
import pathlib
import subprocess
import sys

import jinja2
import jinja2.sandbox
import pytest
import tokenizers

import test_server as ts

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory, shared):
    out = tmp_path_factory.mktemp("ckpt") / "tiny-qwen3"
    subprocess.run([sys.executable, str(ROOT / "tools" / "gen_checkpoint.py"), "tiny-qwen3",
                    str(out), "--tokenizers", str(shared / "tokenizers")], check=True)
    return out


exe = ts.exe


@pytest.fixture(scope="module")
def server(exe, qwen3):
    s = ts.Server(exe, qwen3, "--max-model-len", "1024")
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def idle_after(server):
    yield
    server.wait_idle()


def reference_ids(ckpt, messages, **kwargs):
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=["jinja2.ext.loopcontrols"])

    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
    ctx = dict(messages=messages, add_generation_prompt=True, bos_token=cfg.get("bos_token") or "",
               eos_token=cfg.get("eos_token") or "", **kwargs)
    text = env.from_string(cfg["chat_template"]).render(**ctx)
    tok = tokenizers.Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    return tok.encode(text, add_special_tokens=False).ids


def random_messages():
    msgs = []
    if ts.RNG.random() < 0.5:
        msgs.append({"role": "system", "content": ts.rand_text(ts.RNG.randint(1, 8))})
    for _ in range(ts.RNG.randint(0, 2)):
        msgs.append({"role": "user", "content": ts.rand_text(ts.RNG.randint(1, 8))})
        msgs.append({"role": "assistant", "content": ts.rand_text(ts.RNG.randint(1, 8))})
    msgs.append({"role": "user", "content": ts.rand_text(ts.RNG.randint(1, 12)) + " 你好 ✓"})
    return msgs


@pytest.mark.parametrize("thinking", [None, True, False])
def test_rendered_prompt_matches_reference(server, qwen3, thinking):
    for _ in range(3):
        msgs = random_messages()
        kwargs = {} if thinking is None else {"enable_thinking": thinking}
        want = reference_ids(qwen3, msgs, **kwargs)
        body = {"messages": msgs}
        if kwargs:
            body["chat_template_kwargs"] = kwargs
        status, payload = server.request("POST", "/tokenize", body)
        assert status == 200, payload
        assert json.loads(payload)["tokens"] == want
        r = server.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4,
                                                  temperature=0,
                                                  extra_body={"chat_template_kwargs": kwargs})
        assert r.usage.prompt_tokens == len(want)


def test_chat_stream_n2(server):
    msgs = random_messages()
    kw = dict(model="tiny", messages=msgs, max_tokens=8, temperature=0.8, n=2,
              seed=ts.RNG.randint(0, 1 << 30))
    full = server.client.chat.completions.create(**kw)
    chunks = list(server.client.chat.completions.create(stream=True, **kw))
    for i in range(2):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == full.choices[i].message.content
        assert mine[-1].finish_reason == full.choices[i].finish_reason


def test_max_completion_tokens_and_stop_token_ids(server):
    msgs = random_messages()
    r = server.client.chat.completions.create(model="tiny", messages=msgs, temperature=0,
                                              max_completion_tokens=5,
                                              extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    ids = json.loads(server.request("POST", "/tokenize", {"prompt": r.choices[0].message.content,
                                                          "add_special_tokens": False})[1])
    first = ids["tokens"][0]
    r2 = server.client.chat.completions.create(model="tiny", messages=msgs, temperature=0,
                                               max_tokens=5,
                                               extra_body={"stop_token_ids": [first]})
    assert r2.choices[0].finish_reason == "stop" and r2.usage.completion_tokens <= 1
