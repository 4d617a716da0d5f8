"""A small ColabFold-API-compatible MSA server on 127.0.0.1 for tests (no network beyond it).

It answers upstream's client (`boltz.data.msa.mmseqs2.run_mmseqs2`): POST /ticket/{msa,pair}
with the queries as FASTA (`>101`, `>102`, ...), GET /ticket/<id>, GET /result/download/<id>
with a tar.gz of `pair.a3m` (paired) or `uniref.a3m` + `bfd.mgnify30.metaeuk30.smag30.a3m`,
one a3m block per query, blocks separated by a NUL byte. Hits are the query with one residue
changed, so they are valid rows of the query's length. It counts what it is asked, checks
credentials when told to, and can fail in the ways a real server does.
"""

from __future__ import annotations

import base64
import io
import json
import tarfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

HITS = {"pair.a3m": 3, "uniref.a3m": 4, "bfd.mgnify30.metaeuk30.smag30.a3m": 2}
FAILURES = ("http_error", "slow", "malformed")


def hit(seq: str, k: int) -> str:
    i = k % len(seq)
    return seq[:i] + ("G" if seq[i] == "A" else "A") + seq[i + 1:]


def a3m(queries: list[tuple[int, str]], hits: int, tag: str) -> str:
    blocks = [f">{n}\n{seq}\n" + "".join(f">{tag}_{n}_{k}\n{hit(seq, k)}\n" for k in range(hits))
              for n, seq in queries]
    return "\x00".join(blocks)


class MsaTestServer:
    """``with MsaTestServer() as s: s.url``; ``s.submissions`` counts POSTs by endpoint."""

    def __init__(self, failure: str | None = None, basic_auth: tuple[str, str] | None = None,
                 api_key: tuple[str, str] | None = None, reject: tuple[str, ...] = ()) -> None:
        assert failure in (None, *FAILURES)
        self.failure, self.basic_auth, self.api_key = failure, basic_auth, api_key
        self.reject = set(reject)  # queries with one of these sequences get HTTP 500
        self.submissions: Counter[str] = Counter()
        self.requests = 0
        self.jobs: dict[str, tuple[str, list[tuple[int, str]]]] = {}
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> MsaTestServer:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _authorized(self, headers) -> bool:
        """Either credential that the server was given (none given: anyone)."""
        if self.basic_auth is None and self.api_key is None:
            return True
        if self.basic_auth is not None:
            want = "Basic " + base64.b64encode(":".join(self.basic_auth).encode()).decode()
            if headers.get("Authorization") == want:
                return True
        return self.api_key is not None and headers.get(self.api_key[0]) == self.api_key[1]

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _json(self, obj) -> None:
                self._send(200, json.dumps(obj).encode())

            def do_POST(self) -> None:
                with server.lock:
                    server.requests += 1
                length = int(self.headers.get("Content-Length", 0))
                form = parse_qs(self.rfile.read(length).decode())
                endpoint = self.path.strip("/")
                if not server._authorized(self.headers):
                    return self._send(401, b"Unauthorized", "text/plain")
                if server.failure == "slow":
                    time.sleep(120)
                    return self._send(504, b"late", "text/plain")
                if server.failure == "http_error":
                    return self._send(500, b"Internal Server Error", "text/plain")
                if endpoint not in ("ticket/msa", "ticket/pair"):
                    return self._send(404, b"Not Found", "text/plain")
                lines = form["q"][0].split("\n")
                queries = [(int(lines[i][1:]), lines[i + 1]) for i in range(0, len(lines) - 1, 2)
                           if lines[i].startswith(">")]
                if server.reject & {seq for _, seq in queries}:
                    return self._send(500, b"Internal Server Error", "text/plain")
                with server.lock:
                    server.submissions[endpoint] += 1
                    job = f"job{len(server.jobs)}"
                    server.jobs[job] = (endpoint, queries)
                self._json({"status": "COMPLETE", "id": job})

            def do_GET(self) -> None:
                with server.lock:
                    server.requests += 1
                if not server._authorized(self.headers):
                    return self._send(401, b"Unauthorized", "text/plain")
                parts = self.path.strip("/").split("/")
                if parts[:1] == ["ticket"] and parts[-1] in server.jobs:
                    return self._json({"status": "COMPLETE", "id": parts[-1]})
                if parts[:2] == ["result", "download"] and parts[-1] in server.jobs:
                    if server.failure == "malformed":
                        return self._send(200, b"this is not a tar.gz archive", "application/octet-stream")
                    endpoint, queries = server.jobs[parts[-1]]
                    names = ["pair.a3m"] if endpoint == "ticket/pair" else \
                        ["uniref.a3m", "bfd.mgnify30.metaeuk30.smag30.a3m"]
                    buf = io.BytesIO()
                    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
                        for name in names:
                            data = a3m(queries, HITS[name], name.split(".")[0]).encode()
                            info = tarfile.TarInfo(name)
                            info.size = len(data)
                            tar.addfile(info, io.BytesIO(data))
                    return self._send(200, buf.getvalue(), "application/octet-stream")
                self._send(404, b"Not Found", "text/plain")

        return Handler
