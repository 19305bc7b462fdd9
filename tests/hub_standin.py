"""A local stand-in for the Hugging Face Hub, as huggingface_hub's own tests use a test endpoint: a real HTTP server
on 127.0.0.1 speaking the few routes `hf_hub_download`, `HfApi.create_repo` and `HfApi.create_commit` use, so the
package's real download/upload code runs unchanged (point it here with HF_ENDPOINT).

Routes: HEAD/GET `/{repo}/resolve/{revision}/{path}`; GET `/api/models/{repo}[/revision/{rev}]`;
POST `/api/repos/create`; POST `/api/models/{repo}/preupload/{rev}` (every file "regular", i.e. inlined in the
commit); POST `/api/validate-yaml`; POST `/api/models/{repo}/commit/{rev}` (NDJSON, base64 files). Errors carry `X-Error-Code` as the Hub's do.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class HubStandIn:
    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo_id -> {"commit": sha, "files": {path: bytes}}
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.created: list[dict] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> HubStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_repo(self, repo_id: str, files: dict[str, bytes]) -> str:
        """Publish `files` as one commit of `repo_id`; returns the commit sha."""
        digest = hashlib.sha1(repo_id.encode())
        for name in sorted(files):
            digest.update(name.encode() + hashlib.sha256(files[name]).digest())
        self.repos[repo_id] = {"commit": digest.hexdigest(), "files": dict(files)}
        return self.repos[repo_id]["commit"]

    def add_folder(self, repo_id: str, folder: Path) -> str:
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        return self.add_repo(repo_id, files)

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
                self.send_response(code)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _json(self, code: int, data, head: bool = False):
                self._send(code, json.dumps(data).encode(), {"Content-Type": "application/json"}, head)

            def _error(self, code: int, error_code: str, message: str, head: bool = False):
                self._send(
                    code,
                    json.dumps({"error": message}).encode(),
                    {
                        "X-Error-Code": error_code,
                        "X-Error-Message": message,
                        "Content-Type": "application/json",
                    },
                    head,
                )

            def _resolve(self, head: bool):
                path = unquote(urlparse(self.path).path).lstrip("/")
                parts = path.split("/")
                if len(parts) < 5 or parts[2] != "resolve":
                    return False
                repo_id, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                repo = hub.repos.get(repo_id)
                if repo is None:
                    self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head)
                elif revision not in ("main", repo["commit"]):
                    self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
                elif filename not in repo["files"]:
                    self._error(404, "EntryNotFound", f"{filename} does not exist", head)
                else:
                    body = repo["files"][filename]
                    etag = '"' + hashlib.sha256(body).hexdigest() + '"'
                    headers = {"X-Repo-Commit": repo["commit"], "ETag": etag}
                    self._send(200, body, headers, head)
                return True

            def _model_info(self, head: bool = False):
                parts = unquote(urlparse(self.path).path).strip("/").split("/")
                if len(parts) < 4 or parts[:2] != ["api", "models"]:
                    return False
                repo_id = "/".join(parts[2:4])
                repo = hub.repos.get(repo_id)
                if repo is None:
                    self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head)
                    return True
                siblings = [{"rfilename": name} for name in sorted(repo["files"])]
                info = {"id": repo_id, "modelId": repo_id, "sha": repo["commit"], "siblings": siblings,
                        "private": False, "gated": False, "disabled": False, "tags": []}  # fmt: skip
                self._json(200, info, head)
                return True

            def _whoami(self):
                """`HfApi.whoami`: any bearer token is user `me` with a write token (the push preflight asks)."""
                if urlparse(self.path).path != "/api/whoami-v2":
                    return False
                if not (self.headers.get("Authorization") or "").startswith("Bearer "):
                    self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
                    return True
                self._json(
                    200,
                    {"name": "me", "type": "user", "orgs": [], "auth": {"accessToken": {"role": "write"}}},
                )
                return True

            def do_HEAD(self):
                hub.requests.append(("HEAD", self.path))
                if not self._resolve(head=True):
                    hub.unhandled.append(("HEAD", self.path))
                    self._error(404, "EntryNotFound", "unknown route", head=True)

            def do_GET(self):
                hub.requests.append(("GET", self.path))
                if self._resolve(head=False) or self._model_info() or self._whoami():
                    return
                hub.unhandled.append(("GET", self.path))
                self._error(404, "EntryNotFound", "unknown route")

            def do_POST(self):
                hub.requests.append(("POST", self.path))
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = unquote(urlparse(self.path).path)
                if path == "/api/repos/create":
                    payload = json.loads(body)
                    hub.created.append(payload)
                    repo_id = f"{payload['organization']}/{payload['name']}"
                    hub.repos.setdefault(
                        repo_id, {"commit": hashlib.sha1(repo_id.encode()).hexdigest(), "files": {}}
                    )
                    self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
                    return
                if path == "/api/validate-yaml":  # the Hub checks a README's metadata before a commit
                    self._json(200, {"errors": [], "warnings": []})
                    return
                parts = path.strip("/").split("/")
                if len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] == "preupload":
                    files = json.loads(body)["files"]
                    modes = [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                    ]
                    self._json(200, {"files": modes, "commitOid": hub.repos["/".join(parts[2:4])]["commit"]})
                    return
                if len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] == "commit":
                    repo_id = "/".join(parts[2:4])
                    files = dict(hub.repos.get(repo_id, {}).get("files", {}))
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            value = item["value"]
                            files[value["path"]] = base64.b64decode(value["content"])
                    commit = hub.add_repo(repo_id, files)
                    url = f"{hub.url}/{repo_id}/commit/{commit}"
                    self._json(200, {"commitUrl": url, "commitOid": commit, "success": True})
                    return
                hub.unhandled.append(("POST", self.path))
                self._error(404, "EntryNotFound", "unknown route")

        return Handler
