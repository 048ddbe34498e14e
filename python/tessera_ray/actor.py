"""The Ray actor that owns one tessera worker process: it reports which unit of the device
resource Ray gave it, starts `tessera worker ...` with the unit in the visibility variable, and
ties the worker's life to its own (the worker dies with the actor; the actor reports the
worker's exit). Only the standard library and Ray: this module is shipped to every node by value.
"""
import ctypes
import os
import re
import signal
import subprocess
import threading

import ray

_PR_SET_PDEATHSIG = 1


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


class WorkerHost:
    """One per placement-group bundle; runs in the Ray worker process of its node."""

    def __init__(self, key):
        self._key = key
        self._proc = None
        self._exit = None
        self._done = threading.Event()
        # Loaded here, not in the forked child, so the child only makes one raw call.
        self._libc = _libc()

    def info(self):
        """(node_id, node_ip, unit ids Ray assigned for the key, pid) of this actor."""
        ctx = ray.get_runtime_context()
        worker = ray._private.worker.global_worker
        ids = []
        if self._key == "GPU":
            ids = [str(i) for i in ray.get_gpu_ids()]
        else:
            # Custom resources never appear among accelerator ids; read the raw assignment.
            # Inside a placement group the key shows up as KEY_group_<bundle>_<pg> (and
            # KEY_group_<pg>); both carry the same instance ids.
            pat = re.compile(r"^%s(_group_([0-9]+_)?[0-9a-f]+)?$" % re.escape(self._key))
            seen = set()
            for res, assignment in worker.core_worker.resource_ids().items():
                if pat.match(res):
                    for rid, _ in assignment:
                        seen.add(str(rid))
            ids = sorted(seen)
        return ctx.get_node_id(), worker.node_ip_address, ids, os.getpid()

    def start(self, argv, env_add):
        """Starts the worker with env_add on top of this process's environment; returns its pid.
        Its stdout goes to stderr so nothing it prints can be mistaken for launcher output."""
        env = dict(os.environ)
        env.update(env_add)
        parent = os.getpid()
        libc = self._libc

        def tie_to_parent():
            # SIGKILL when the thread that forked us dies: that is the watcher thread below,
            # which lives until the worker exits, or dies with the whole actor process.
            if libc is not None:
                libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:
                os._exit(1)

        started = threading.Event()
        failure = []

        def run():
            try:
                self._proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=2,
                                              stderr=2, preexec_fn=tie_to_parent,
                                              start_new_session=True, close_fds=True)
            except OSError as e:
                failure.append(e)
                self._exit = 127
                started.set()
                self._done.set()
                return
            started.set()
            self._exit = self._proc.wait()
            self._done.set()

        threading.Thread(target=run, daemon=True, name="tessera-worker").start()
        started.wait()
        if failure:
            raise RuntimeError("cannot start %s: %s" % (argv[0], failure[0]))
        return self._proc.pid

    def wait(self):
        """Returns the worker's exit status (negative: killed by that signal) once it exits."""
        self._done.wait()
        return self._exit

    def stop(self, grace_s=3.0):
        """SIGTERM to the worker's process group, SIGKILL after grace_s; returns the status."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            if not self._done.wait(grace_s):
                try:
                    os.killpg(self._proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self._done.wait(grace_s)
        return self._proc.poll()
