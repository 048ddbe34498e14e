"""A local stand-in for the Hugging Face hub's HTTP interface, enough for tessera's downloader:

    GET /api/models/OWNER/NAME/revision/REV   model info: commit sha and files (sizes, blob ids)
    GET /OWNER/NAME/resolve/REV/FILE          file contents, with Range support

Repositories are dicts {revision: {filename: bytes}}. Knobs let a test require a token, cut a
transfer short once (to exercise resume), or misreport a file's size.
"""
import hashlib
import http.server
import json
import re
import threading


class FakeHub:
    def __init__(self, repos, token=None):
        self.repos = repos  # {"owner/name": {"main": {"file": b"..."}}}
        self.token = token
        self.cut_once = {}  # filename -> bytes to send before dropping the connection, once
        self.lie_size = {}  # filename -> size to report instead of the real one
        self.requests = []  # (path, range header) for every request
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self):
        return "http://127.0.0.1:%d" % self.server.server_address[1]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def commit_of(repo, rev):
        return hashlib.sha1(("%s@%s" % (repo, rev)).encode()).hexdigest()

    def _info(self, repo, rev):
        files = self.repos[repo][rev]
        siblings = []
        for name, data in sorted(files.items()):
            size = self.lie_size.get(name, len(data))
            entry = {"rfilename": name, "blobId": hashlib.sha1(data).hexdigest(), "size": size}
            if name.endswith((".safetensors", ".gguf")):
                entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": size}
            siblings.append(entry)
        return {"id": repo, "sha": self.commit_of(repo, rev), "siblings": siblings}

    def _find(self, repo, rev):
        revs = self.repos.get(repo)
        if revs is None:
            return None
        if rev in revs:
            return rev
        for name in revs:  # a commit hash names its revision too
            if self.commit_of(repo, name) == rev:
                return name
        return None

    def _handler(self):
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, code, body, ctype="application/json", extra=None):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                hub.requests.append((self.path, self.headers.get("Range")))
                if hub.token and self.headers.get("Authorization") != "Bearer " + hub.token:
                    return self._send(401, b'{"error": "Invalid credentials"}')
                m = re.match(r"^/api/models/([^/]+/[^/]+)/revision/([^/?]+)", self.path)
                if m:
                    rev = hub._find(m.group(1), m.group(2))
                    if rev is None:
                        return self._send(404, b'{"error": "Repository not found"}')
                    return self._send(200, json.dumps(hub._info(m.group(1), rev)).encode())
                m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", self.path)
                if not m:
                    return self._send(404, b'{"error": "not found"}')
                rev = hub._find(m.group(1), m.group(2))
                data = hub.repos[m.group(1)][rev].get(m.group(3)) if rev else None
                if data is None:
                    return self._send(404, b'{"error": "Entry not found"}')
                start = 0
                rng = self.headers.get("Range")
                if rng:
                    start = int(re.match(r"bytes=(\d+)-", rng).group(1))
                body = data[start:]
                cut = hub.cut_once.pop(m.group(3), None)
                self.send_response(206 if rng else 200)
                self.send_header("Content-Length", str(len(body)))
                if rng:
                    self.send_header("Content-Range",
                                     "bytes %d-%d/%d" % (start, len(data) - 1, len(data)))
                self.end_headers()
                if cut is not None:
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

        return Handler
