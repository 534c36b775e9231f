"""Test-only write front for an offline olah mirror (standard library only).

Implements the Hub write endpoints huggingface_hub uses (create repo, validate-yaml, preupload, LFS batch + basic PUT,
NDJSON commit), turns each commit into a real git commit in olah's mirror folder, and reverse-proxies every other
request to olah, papering over two offline-mirror quirks (see shared/docs/hub-testing.md §4-5).

Run: python front.py --port P --olah-port Q --mirrors DIR --blobs DIR
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.client
import json
import os
import re
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub stores files >= 10 MB through LFS
TYPES = {"models": "", "datasets": "datasets/", "spaces": "spaces/"}
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
               "proxy-authenticate", "host", "content-length"}
_GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "hub-front", "GIT_AUTHOR_EMAIL": "front@127.0.0.1",
            "GIT_COMMITTER_NAME": "hub-front", "GIT_COMMITTER_EMAIL": "front@127.0.0.1", "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull}

RE_REPO_INFO = re.compile(r"^/api/(models|datasets|spaces)/([^/]+/[^/]+)$")
RE_PREUPLOAD = re.compile(r"^/api/(models|datasets|spaces)/([^/]+/[^/]+)/preupload/([^/]+)$")
RE_COMMIT = re.compile(r"^/api/(models|datasets|spaces)/([^/]+/[^/]+)/commit/([^/]+)$")
RE_LFS_BATCH = re.compile(r"^/(datasets/|spaces/)?([^/]+/[^/]+)\.git/info/lfs/objects/batch$")
RE_RESOLVE = re.compile(r"^/(datasets/|spaces/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
RE_REV_INFO = re.compile(r"^/api/(models|datasets|spaces)/([^/]+/[^/]+)/revision/([^/]+)$")


def git(repo: Path, *args: str) -> str:
    out = subprocess.run(["git", "-c", "commit.gpgsign=false", *args], cwd=repo, env=_GIT_ENV, check=True,
                         capture_output=True, text=True, timeout=60)
    return out.stdout.strip()


class Front:
    def __init__(self, port: int, olah_port: int, mirrors: Path, blobs: Path):
        self.port, self.olah_port, self.mirrors, self.blobs = port, olah_port, mirrors, blobs
        self.endpoint = f"http://127.0.0.1:{port}"
        self.lock = threading.Lock()  # one git writer at a time

    def repo_dir(self, type_plural: str, repo_id: str) -> Path:
        return self.mirrors / type_plural / repo_id

    def rev_exists(self, repo: Path, rev: str) -> bool:
        try:
            git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
            return True
        except subprocess.CalledProcessError:
            return False


class Handler(BaseHTTPRequestHandler):
    front: Front
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # keep pytest output clean
        pass

    # ------------------------------------------------------------------ helpers
    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, payload=None, headers: dict | None = None, raw: bytes | None = None):
        data = raw if raw is not None else (json.dumps(payload).encode() if payload is not None else b"")
        self.send_response(status)
        if raw is None:
            self.send_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, code: str, message: str):
        self._send(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

    # ------------------------------------------------------------------ routing
    def do_GET(self):
        self._proxy(b"")

    def do_HEAD(self):
        self._proxy(b"")

    def do_POST(self):
        path = unquote(urlsplit(self.path).path)
        body = self._body()
        if path == "/api/repos/create":
            return self._create_repo(json.loads(body or b"{}"))
        if path == "/api/validate-yaml":
            return self._send(200, {"errors": [], "warnings": []})
        if RE_PREUPLOAD.match(path):
            return self._preupload(json.loads(body))
        if RE_LFS_BATCH.match(path):
            return self._lfs_batch(json.loads(body))
        if m := RE_COMMIT.match(path):
            return self._commit(m.group(1), m.group(2), m.group(3), body)
        self._proxy(body)

    def do_PUT(self):
        path = urlsplit(self.path).path
        body = self._body()
        if m := re.match(r"^/lfs-upload/([0-9a-f]{64})$", path):
            if hashlib.sha256(body).hexdigest() != m.group(1):
                return self._error(400, "BadRequest", "uploaded bytes do not match the sha256 oid")
            (self.front.blobs / m.group(1)).write_bytes(body)
            return self._send(200, {})
        self._error(404, "NotFound", f"no PUT route {path}")

    # ------------------------------------------------------------------ write endpoints
    def _create_repo(self, req: dict):
        type_plural = (req.get("type") or "model") + "s"
        if type_plural not in TYPES:
            return self._error(400, "BadRequest", f"unknown repo type {req.get('type')!r}")
        repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
        if "/" not in repo_id:
            return self._error(400, "BadRequest", "this test server needs an 'org/name' repo id")
        url = f"{self.front.endpoint}/{TYPES[type_plural]}{repo_id}"
        repo = self.front.repo_dir(type_plural, repo_id)
        with self.front.lock:
            if repo.exists():
                return self._send(409, {"error": "You already created this repo", "url": url})
            repo.mkdir(parents=True)
            git(repo, "init", "-q", "-b", "main")
            (repo / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
            git(repo, "add", "-A")
            git(repo, "commit", "-q", "-m", "initial commit")
        self._send(200, {"url": url, "name": repo_id})

    def _preupload(self, req: dict):
        files = [{"path": f["path"], "uploadMode": "lfs" if f["size"] >= LFS_THRESHOLD else "regular",
                  "shouldIgnore": False} for f in req.get("files", [])]
        self._send(200, {"files": files, "commitOid": None})

    def _lfs_batch(self, req: dict):
        objects = []
        for obj in req.get("objects", []):
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if not (self.front.blobs / obj["oid"]).exists():
                entry["actions"] = {"upload": {"href": f"{self.front.endpoint}/lfs-upload/{obj['oid']}"}}
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def _commit(self, type_plural: str, repo_id: str, rev: str, body: bytes):
        repo = self.front.repo_dir(type_plural, repo_id)
        if not repo.exists():
            return self._error(404, "RepoNotFound", f"repository {repo_id} not found")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next((x["value"] for x in lines if x["key"] == "header"), {})
        with self.front.lock:
            branch = git(repo, "rev-parse", "--abbrev-ref", "HEAD")
            if rev != branch:
                return self._error(400, "BadRequest", f"this test server commits to {branch!r} only, got {rev!r}")
            parent = header.get("parentCommit")
            if parent and parent != git(repo, "rev-parse", "HEAD"):
                return self._error(412, "PreconditionFailed", "parentCommit is not the head of the branch")
            for item in lines:
                key, value = item["key"], item["value"]
                if key == "header":
                    continue
                target = (repo / value["path"]).resolve()
                if repo.resolve() not in target.parents:
                    return self._error(400, "BadRequest", f"path escapes the repository: {value['path']!r}")
                if key == "file":
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(base64.b64decode(value["content"]))
                elif key == "lfsFile":
                    blob = self.front.blobs / value["oid"]
                    if not blob.exists():
                        return self._error(422, "BadRequest", f"LFS object {value['oid']} was never uploaded")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(blob, target)
                elif key == "deletedFile":
                    target.unlink(missing_ok=True)
                elif key == "deletedFolder":
                    shutil.rmtree(target, ignore_errors=True)
                else:
                    return self._error(400, "BadRequest", f"unsupported commit operation {key!r}")
            git(repo, "add", "-A")
            message = header.get("summary") or "update"
            if header.get("description"):
                message += "\n\n" + header["description"]
            git(repo, "commit", "-q", "--allow-empty", "-m", message)
            oid = git(repo, "rev-parse", "HEAD")
        prefix = TYPES[type_plural]
        self._send(200, {"commitUrl": f"{self.front.endpoint}/{prefix}{repo_id}/commit/{oid}", "commitOid": oid})

    # ------------------------------------------------------------------ reads: proxy to olah
    def _proxy(self, body: bytes):
        split = urlsplit(self.path)
        path = unquote(split.path)
        upstream_path = self.path
        if self.command == "GET" and (m := RE_REPO_INFO.match(path)):
            # quirk 1: offline olah only answers repo info for an explicit revision
            upstream_path = f"/api/{m.group(1)}/{m.group(2)}/revision/main" + (f"?{split.query}" if split.query else "")
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
        conn = http.client.HTTPConnection("127.0.0.1", self.front.olah_port, timeout=120)
        try:
            conn.request(self.command, upstream_path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except OSError as e:
            return self._error(502, "BadGateway", f"olah unreachable: {e}")
        finally:
            conn.close()
        if resp.status == 401:
            return self._not_found(path)
        out_headers = {k: v for k, v in resp.getheaders() if k.lower() not in HOP_HEADERS}
        self.send_response(resp.status)
        for k, v in out_headers.items():
            self.send_header(k, v)
        length = resp.getheader("Content-Length") if self.command == "HEAD" else None
        self.send_header("Content-Length", length or str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _not_found(self, path: str):
        # quirk 2: offline olah answers 401 for anything it cannot find; give the client the Hub's 404 error codes
        m = RE_RESOLVE.match(path) or RE_REV_INFO.match(path) or RE_REPO_INFO.match(path)
        if m is None:
            return self._error(404, "NotFound", f"not found: {path}")
        type_plural = (m.group(1) or "").strip("/") or "models"
        type_plural = type_plural if type_plural.endswith("s") else type_plural + "s"
        repo = self.front.repo_dir(type_plural, m.group(2))
        if not (repo / ".git").exists():
            return self._error(404, "RepoNotFound", f"repository {m.group(2)} not found")
        rev = unquote(m.group(3)) if m.lastindex and m.lastindex >= 3 else "main"
        if not self.front.rev_exists(repo, rev):
            return self._error(404, "RevisionNotFound", f"invalid revision {rev!r}")
        return self._error(404, "EntryNotFound", f"entry not found: {path}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--olah-port", type=int, required=True)
    ap.add_argument("--mirrors", type=Path, required=True)
    ap.add_argument("--blobs", type=Path, required=True)
    args = ap.parse_args()
    args.blobs.mkdir(parents=True, exist_ok=True)
    Handler.front = Front(args.port, args.olah_port, args.mirrors, args.blobs)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
