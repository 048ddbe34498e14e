"""Fault handling of the process executor, black-box: a worker killed in the middle of a stream
fails that request, turns /health to 503 and shuts the server down with a clear message (or, with
--restart-workers, every worker is relaunched and new requests succeed with the right text); a
stalled worker is noticed by pings, idle or mid-step; connections with the wrong launch secret or
model fingerprint are dropped and logged; nothing is left running."""
import json
import os
import signal
import subprocess
import time

from dist_helpers import RNG, Serve, rand_prompt, read_sse

STORIES = "models/stories260K-hf"


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def kill_mid_stream(s, rank_pid):
    """Starts a long stream, kills one worker once tokens flow; returns the stream's chunks."""
    conn, resp = s.stream_open(rand_prompt(), 480, ignore_eos=True)
    chunks = read_sse(resp)
    first = json.loads(next(chunks))
    assert "error" not in first
    os.kill(rank_pid, signal.SIGKILL)
    rest = [json.loads(d) for d in chunks]
    conn.close()
    return rest


def test_worker_killed_mid_stream_shuts_down(tessera, shared):
    s = Serve(tessera, shared / STORIES, "-tp", 2, "-pp", 2,
              env={"TESSERA_FAULT_GRACE_MS": "4000"})
    try:
        workers = s.workers()
        assert sorted(workers) == [0, 1, 2, 3]
        rank = RNG.randrange(4)
        rest = kill_mid_stream(s, workers[rank])
        errors = [c["error"]["message"] for c in rest if "error" in c]
        assert errors and f"worker rank {rank}" in errors[0], rest
        # Within the grace period the server still answers, and says it is unhealthy.
        status, body = s.request("GET", "/health")
        assert status == 503 and b"shutting down" in body, body
        assert s.proc.wait(timeout=40) == 1
        log = s.text()
        assert "tessera serve: worker failure:" in log and f"worker rank {rank}" in log
        assert "--restart-workers" in log
        assert wait_gone(workers.values()) == []
    finally:
        s.stop()


def test_restart_workers(tessera, shared):
    s = Serve(tessera, shared / STORIES, "-tp", 2, "-pp", 2, "--restart-workers",
              "--max-model-len", 512)
    try:
        prompt = rand_prompt()
        want = s.complete([prompt], 40, ignore_eos=True)
        old = s.workers()
        rank = RNG.randrange(4)
        rest = kill_mid_stream(s, old[rank])
        assert any("error" in c for c in rest), rest
        s.wait_log(r"restarting all 4 workers \(attempt 1 of 3\)")
        s.wait_log(r"every worker is back")
        s.wait_health(200)
        new = s.workers()
        assert sorted(new) == [0, 1, 2, 3] and not set(new.values()) & set(old.values())
        assert wait_gone(old.values()) == []
        # The prompt's blocks were in the prefix cache before the restart: the cache was dropped,
        # so the same prompt gives the same text on the new workers.
        assert s.complete([prompt], 40, ignore_eos=True) == want
    finally:
        s.stop()
    assert wait_gone(new.values()) == []


def test_stalled_worker_idle_is_noticed(tessera, shared):
    s = Serve(tessera, shared / STORIES, "-pp", 2, env={"TESSERA_PING_TIMEOUT_MS": "1000",
                                                        "TESSERA_FAULT_GRACE_MS": "4000"})
    try:
        assert s.health() == 200
        workers = s.workers()
        rank = RNG.randrange(2)
        os.kill(workers[rank], signal.SIGSTOP)
        s.wait_log(rf"worker rank {rank} on 127\.0\.0\.1 did not answer a ping within 1000 ms")
        assert s.health() == 503
        assert s.proc.wait(timeout=40) == 1
        assert wait_gone(workers.values()) == []
    finally:
        s.stop()


def test_stalled_worker_mid_step_is_noticed(tessera, shared):
    # Pipeline only (no all-reduce peer to time out): the driver's in-step pings catch it.
    s = Serve(tessera, shared / STORIES, "-pp", 2, "--restart-workers",
              env={"TESSERA_STEP_PING_TIMEOUT_MS": "2000"})
    try:
        workers = s.workers()
        conn, resp = s.stream_open(rand_prompt(), 480, ignore_eos=True)
        chunks = read_sse(resp)
        assert "error" not in json.loads(next(chunks))
        rank = RNG.randrange(2)
        os.kill(workers[rank], signal.SIGSTOP)
        rest = [json.loads(d) for d in chunks]
        conn.close()
        errors = [c["error"]["message"] for c in rest if "error" in c]
        assert errors and f"worker rank {rank} " in errors[0] and "answered no ping" in errors[0], rest
        s.wait_health(200)
        assert s.complete([rand_prompt()], 8)
    finally:
        s.stop()


def worker_argv_env(s, rank):
    """A live worker's argv and launch secret (read from /proc, as root may)."""
    pid = s.workers()[rank]
    argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[:-1]
    env = dict(e.split(b"=", 1) for e in open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
               if b"=" in e)
    return [a.decode() for a in argv], env[b"TESSERA_SECRET"].decode()


def test_bad_handshakes_dropped_and_logged(tessera, shared, checkpoints):
    s = Serve(tessera, shared / STORIES, "-tp", 2)
    try:
        argv, secret = worker_argv_env(s, 0)
        assert secret not in " ".join(argv)  # never on the command line
        assert all(secret not in open(f"/proc/{p}/cmdline").read() for p in s.workers().values())
        # Wrong secret: a random one of the right length.
        wrong = "".join(RNG.choice("0123456789abcdef") for _ in range(len(secret)))
        p = subprocess.run(argv, env=dict(os.environ, TESSERA_SECRET=wrong), capture_output=True,
                           text=True, timeout=60)
        assert p.returncode != 0 and "wrong launch secret" in p.stderr, p.stderr
        s.wait_log(r"rejected connection from 127\.0\.0\.1:\d+: wrong launch secret")
        # Right secret, another model: the fingerprint differs.
        other = list(argv)
        other[other.index("--model") + 1] = str(checkpoints["tiny-qwen3"]["hf"])
        p = subprocess.run(other, env=dict(os.environ, TESSERA_SECRET=secret),
                           capture_output=True, text=True, timeout=60)
        assert p.returncode != 0 and "model fingerprint" in p.stderr, p.stderr
        s.wait_log(r"rejected connection from 127\.0\.0\.1:\d+: model fingerprint")
        # Right secret and model, but every rank is taken.
        p = subprocess.run(argv, env=dict(os.environ, TESSERA_SECRET=secret), capture_output=True,
                           text=True, timeout=60)
        assert p.returncode != 0
        s.wait_log(r"dropped a connection from 127\.0\.0\.1:\d+ \(rank 0\): every rank is already "
                   r"connected")
        # Still serving.
        assert s.health() == 200
        assert s.complete([rand_prompt()], 8)
    finally:
        s.stop()


def test_driver_killed_takes_workers_along(tessera, shared):
    s = Serve(tessera, shared / STORIES, "-tp", 2, "-pp", 2)
    try:
        workers = s.workers()
        assert len(workers) == 4
        s.proc.kill()  # no chance to say goodbye: the workers notice on their own
        s.proc.wait()
        assert wait_gone(workers.values()) == []
    finally:
        s.stop()
