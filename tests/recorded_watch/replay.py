"""Replays session.json over HTTP the way the Kubernetes API server answers list and watch requests."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

HERE = Path(__file__).resolve().parent


class ReplayServer:
    """Serves `session` to requests under `path_prefix`; `also` maps further path prefixes to their own
    sessions (one exporter watching several kinds), each replayed in its own order."""

    def __init__(self, session: Path = HERE / "session.json", path_prefix: str = "/apis/kubeflow.org/v1",
                 also: dict[str, Path] | None = None) -> None:
        self.scripts = {prefix: {"exchanges": json.loads(path.read_text())["exchanges"], "next": 0}
                        for prefix, path in {path_prefix: session, **(also or {})}.items()}
        self.exchanges = self.scripts[path_prefix]["exchanges"]
        self.path_prefix = path_prefix
        self.requests: list[tuple[str, str, str]] = []  # (kind, path, resourceVersion)
        self.mismatches: list[str] = []
        self.resume = threading.Event()  # releases an exchange marked "pause" before it ends
        self.paused = threading.Event()  # set while such an exchange waits
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        replay = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                replay._serve(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "ReplayServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stopping.set()
        self.resume.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def consumed(self) -> int:
        return self.scripts[self.path_prefix]["next"]

    def consumed_of(self, path_prefix: str) -> int:
        return self.scripts[path_prefix]["next"]

    def kubeconfig(self, folder: Path) -> Path:
        path = folder / "kubeconfig"
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "replay",
            "clusters": [{"name": "replay", "cluster": {"server": self.url}}],
            "users": [{"name": "replay", "user": {}}],
            "contexts": [{"name": "replay", "context": {"cluster": "replay", "user": "replay"}}]}))
        return path

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        url = urlparse(h.path)
        query = parse_qs(url.query)
        kind = "watch" if query.get("watch", ["false"])[0] in ("true", "1") else "list"
        rv = query.get("resourceVersion", [""])[0]
        prefixes = [p for p in self.scripts if url.path.startswith(p)]
        script = self.scripts[max(prefixes, key=len)] if prefixes else None
        with self._lock:
            self.requests.append((kind, url.path, rv))
            step = None
            if script is not None and script["next"] < len(script["exchanges"]):
                step = script["exchanges"][script["next"]]
                script["next"] += 1
        if script is None:
            self.mismatches.append(f"unexpected path {url.path}")
        if step is None:  # script exhausted: behave like a quiet watch
            self._hold(h, kind)
            return
        if step["request"] != kind or step.get("resourceVersion", rv) != rv:
            self.mismatches.append(f"expected {step['request']} rv={step.get('resourceVersion')}, got {kind} rv={rv}")
        if kind == "list":
            body = (HERE / step["body"]).read_bytes()
            h.send_response(step.get("status", 200))
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
            return
        self._start_chunked(h)
        data = (HERE / step["stream"]).read_bytes()
        complete, _, partial = data.rpartition(b"\n")
        for line in complete.split(b"\n") if complete else []:
            self._chunk(h, line + b"\n")
        if step.get("pause"):
            self.paused.set()
            self.resume.wait()
            self.paused.clear()
        end = step.get("end", "close")
        if end == "drop":
            self._chunk(h, partial)
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(2)  # cut mid-event, without the terminating chunk
        elif end == "hold":
            self._hold_open()
            self._end_chunked(h)
        else:
            self._end_chunked(h)

    def _hold(self, h: BaseHTTPRequestHandler, kind: str) -> None:
        if kind == "list":
            h.send_error(503)
            return
        self._start_chunked(h)
        self._hold_open()
        self._end_chunked(h)

    def _hold_open(self) -> None:
        self._stopping.wait()

    @staticmethod
    def _start_chunked(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()

    @staticmethod
    def _chunk(h: BaseHTTPRequestHandler, data: bytes) -> None:
        h.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        h.wfile.flush()

    @staticmethod
    def _end_chunked(h: BaseHTTPRequestHandler) -> None:
        try:
            h.wfile.write(b"0\r\n\r\n")
            h.wfile.flush()
        except OSError:
            pass
