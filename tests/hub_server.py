"""Offline stand-ins for the Hugging Face Hub: a pre-populated cache, and a loopback server for uploads.

``populate_cache`` writes files in huggingface_hub's cache layout (refs -> snapshots -> blobs), so
``hf_hub_download`` finds them with ``HF_HUB_OFFLINE=1``. ``LocalHub`` answers the few endpoints that
huggingface_hub's own ``create_repo`` / ``upload_folder`` commit machinery calls, and keeps the committed files.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def populate_cache(cache_dir: Path, repo_id: str, files: dict[str, bytes], *, revision: str = "main",
                   commit: str | None = None) -> str:  # fmt: skip
    """Put ``files`` (path in repo -> bytes) into the cache as commit ``commit`` of branch ``revision``."""
    commit = commit or hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
    repo = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    for path, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    return commit


class LocalHub:
    """A loopback HTTP server speaking just enough of the Hub API for ``create_repo`` and ``upload_folder``."""

    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _reply(self, payload: dict, status: int = 200):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):  # noqa: N802 (http.server's naming)
                data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hub.requests.append(f"POST {self.path}")
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts == ["api", "validate-yaml"]:  # model card metadata check
                    return self._reply({"errors": [], "warnings": []})
                if parts[:3] == ["api", "repos", "create"]:
                    body = json.loads(data)
                    repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
                    hub.repos.setdefault(repo_id, {})
                    return self._reply({"url": f"{hub.endpoint}/{repo_id}", "name": repo_id, "id": repo_id})
                if parts[:2] == ["api", "models"] and "preupload" in parts:
                    files = json.loads(data)["files"]
                    return self._reply(
                        {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
                    )
                if parts[:2] == ["api", "models"] and "commit" in parts:
                    repo_id = "/".join(parts[2 : parts.index("commit")])
                    for line in data.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            value = item["value"]
                            hub.repos[repo_id][value["path"]] = base64.b64decode(value["content"])
                    oid = "c" * 40
                    return self._reply({"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid})
                return self._reply({"error": f"unexpected {self.path}"}, status=404)

            def do_GET(self):  # noqa: N802
                hub.requests.append(f"GET {self.path}")
                return self._reply({"error": f"unexpected {self.path}"}, status=404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> LocalHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def point_hub_at(monkeypatch, endpoint: str) -> None:
    """Make every ``HfApi`` (and so ``push_to_hub``/``upload_folder``) talk to ``endpoint``."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    original = huggingface_hub.hf_api.HfApi.__init__

    def init(self, *args, **kwargs):
        kwargs["endpoint"] = endpoint
        original(self, *args, **kwargs)

    monkeypatch.setattr(huggingface_hub.hf_api.HfApi, "__init__", init)
