"""Helpers for the distributed black-box tests: a `tessera serve` process on a port it picked, its
stderr kept in a list, its worker processes found through /proc, and raw HTTP and SSE calls."""
import http.client
import json
import os
import pathlib
import random
import re
import subprocess
import threading
import time

RNG = random.Random(int.from_bytes(os.urandom(4), "little"))
WORDS = ("the cat dog ran sun tree big little girl boy happy sad play ball park went saw "
         "Lily Tom friend day time once upon a there was").split()


def rand_prompt(lo=2, hi=12):
    return " ".join(RNG.choice(WORDS) for _ in range(RNG.randint(lo, hi)))


class Serve:
    """One `tessera serve` on 127.0.0.1 with --port 0; stderr is drained into self.log."""

    def __init__(self, exe, model, *args, env=None, start_timeout=60):
        full_env = dict(os.environ, **(env or {}))
        self.proc = subprocess.Popen([exe, "serve", str(model), "--host", "127.0.0.1", "--port",
                                      "0", "--served-model-name", "tiny", *map(str, args)],
                                     stderr=subprocess.PIPE, text=True, env=full_env)
        self.log = []
        self.port = None
        deadline = time.time() + start_timeout
        while time.time() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.log.append(line)
            m = re.search(r"on http://[^:]+:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                break
        if self.port is None:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError("server did not start:\n" + "".join(self.log))
        self._drain = threading.Thread(target=lambda: [self.log.append(l) for l in self.proc.stderr],
                                       daemon=True)
        self._drain.start()

    def text(self):
        return "".join(self.log)

    def wait_log(self, pattern, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            m = re.search(pattern, self.text())
            if m:
                return m
            time.sleep(0.05)
        raise AssertionError(f"no log line matching {pattern!r}:\n{self.text()}")

    def request(self, method, path, body=None, timeout=60):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        conn.request(method, path, body=json.dumps(body) if body is not None else None,
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        payload = r.read()
        conn.close()
        return r.status, payload

    def health(self):
        try:
            return self.request("GET", "/health", timeout=10)[0]
        except OSError:
            return None

    def wait_health(self, want, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.health() == want:
                return
            time.sleep(0.05)
        raise AssertionError(f"/health never answered {want}:\n{self.text()}")

    def complete(self, prompts, max_tokens, **extra):
        """Greedy completions of a list of prompts in one request: texts in prompt order."""
        status, body = self.request("POST", "/v1/completions", {
            "model": "tiny", "prompt": prompts, "max_tokens": max_tokens, "temperature": 0,
            **extra})
        assert status == 200, body
        choices = sorted(json.loads(body)["choices"], key=lambda c: c["index"])
        return [c["text"] for c in choices]

    def stream_open(self, prompt, max_tokens, **extra):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("POST", "/v1/completions", body=json.dumps({
            "model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, **extra}), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200
        return conn, r

    def workers(self):
        """{rank: pid} of this server's worker processes."""
        out = {}
        for d in pathlib.Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                stat = (d / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                if ppid != self.proc.pid:
                    continue
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except (OSError, ValueError, IndexError):
                continue
            if b"worker" in argv and b"--rank" in argv:
                out[int(argv[argv.index(b"--rank") + 1])] = int(d.name)
        return out

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._drain.join(timeout=5)


def read_sse(resp):
    """Yields each `data:` payload of an SSE response (str), until [DONE] or EOF."""
    while True:
        line = resp.readline()
        if not line:
            return
        line = line.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            return
        yield data
