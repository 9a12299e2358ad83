"""Replays a recorded Kubernetes API conversation over real HTTP, in order.

Each scenario file (tests/recorded/*.json) lists exchanges: the request datctl must send next (method, path,
optional query subset) and the API server's recorded answer (status, content type, body). A create can answer
with the posted object plus the fields the server adds (`echo` + `set`), as the API server does, and a merge
patch with the object created earlier in the conversation, patched (`patched`). Requests are
kept for assertions; a request out of order gets a 599 and is listed in `mismatches`.
"""
from __future__ import annotations

import copy
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

HERE = Path(__file__).resolve().parent


def _merge(base: Any, extra: Any) -> Any:
    if isinstance(base, dict) and isinstance(extra, dict):
        out = dict(base)
        for key, value in extra.items():
            out[key] = _merge(base.get(key), value)
        return out
    return copy.deepcopy(extra)


def _merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge_patch(out.get(key), value)
    return out


class ReplayServer:
    def __init__(self, scenario: str, substitutions: dict[str, str] | None = None) -> None:
        text = (HERE / f"{scenario}.json").read_text()
        for key, value in (substitutions or {}).items():
            text = text.replace("{{" + key + "}}", value)
        self.exchanges = json.loads(text)["exchanges"]
        self.requests: list[dict[str, Any]] = []
        self.mismatches: list[str] = []
        self.created: dict[str, Any] = {}  # path of each object created so far: the object as answered
        self._next = 0
        self._lock = threading.Lock()
        replay = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                replay._serve(self)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _any

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "ReplayServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def done(self) -> bool:
        return self._next == len(self.exchanges)

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        url = urlparse(handler.path)
        url = url._replace(path=unquote(url.path))
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        with self._lock:
            request = {"method": handler.command, "path": url.path, "query": query, "body": body,
                       "headers": {k.lower(): v for k, v in handler.headers.items()}}
            self.requests.append(request)
            expected = self.exchanges[self._next] if self._next < len(self.exchanges) else None
            want = expected["request"] if expected else None
            if (want is None or want["method"] != handler.command or want["path"] != url.path
                    or any(query.get(k) != v for k, v in want.get("query", {}).items())):
                self.mismatches.append(f"unexpected {handler.command} {handler.path} (expected "
                                       f"{want['method'] + ' ' + want['path'] if want else 'nothing'})")
                self._send(handler, 599, "text/plain", b"not in the recorded conversation")
                return
            self._next += 1
        answer = expected["response"]
        payload = answer.get("body")
        if answer.get("echo"):
            payload = _merge(body, answer.get("set", {}))
            if handler.command == "POST" and "dryRun" not in query and answer["status"] == 201:
                self.created[f"{url.path}/{payload['metadata']['name']}"] = payload
        if answer.get("patched"):  # a JSON merge patch (RFC 7386) of what was created
            payload = self.created[url.path] = _merge(self.created[url.path], answer.get("set", {}))
            payload = self.created[url.path] = _merge_patch(payload, body)
        content_type = answer.get("contentType", "application/json")
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        self._send(handler, answer["status"], content_type, data)

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, content_type: str, data: bytes) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)


def kubeconfig(path: Path, server: str, namespace: str = "team-a") -> Path:
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "replay",
        "clusters": [{"name": "replay", "cluster": {"server": server}}],
        "users": [{"name": "tester", "user": {"token": "recorded-token"}}],
        "contexts": [{"name": "replay", "context": {"cluster": "replay", "user": "tester", "namespace": namespace}}],
    }))
    return path
