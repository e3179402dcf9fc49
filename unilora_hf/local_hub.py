"""A small in-memory Hugging Face Hub server for tests and offline demos.

``LocalHubServer`` answers the subset of the Hub HTTP API that ``huggingface_hub``'s
upload and download calls use, so the real client can push to and pull from
``http://127.0.0.1:<port>`` with no internet access::

    with LocalHubServer(tokens={"hf_test_token": "alice"}) as hub:
        api = HfApi(endpoint=hub.url, token="hf_test_token")
        api.create_repo("alice/demo")
        api.upload_folder(repo_id="alice/demo", folder_path="out/")
        path = hf_hub_download("alice/demo", "config.json", endpoint=hub.url, token="hf_test_token")

From a shell: ``python -m unilora_hf.local_hub --port 8765 --token hf_local:alice``, then point
the client at the printed URL (``HF_ENDPOINT=<url>`` or ``endpoint=<url>``).

What it answers (``{type}`` is ``models``, ``datasets`` or ``spaces``; ``{rev}`` is a branch,
a commit sha or ``refs/pr/N``, URL-encoded):

* ``GET /api/whoami-v2``; ``POST /api/repos/create``; ``DELETE /api/repos/delete``;
  ``POST /api/validate-yaml`` (always valid)
* ``GET /api/{type}/{ns}/{name}[/revision/{rev}]`` (repo info: ``sha``, ``siblings``, ...)
* ``GET /api/{type}/{repo}/tree/{rev}[/{path}]`` and ``POST .../paths-info/{rev}``
* ``POST .../preupload/{rev}`` (every file is ``"regular"``: no LFS, no Xet) and
  ``POST .../commit/{rev}`` (NDJSON: ``header``, ``file``, ``deletedFile``, ``deletedFolder``;
  ``?create_pr=1`` opens ``refs/pr/N``); a commit is applied all-or-nothing
* ``PUT .../settings`` (visibility), ``POST``/``DELETE .../branch/{name}``,
  ``POST .../discussions`` (pull requests only) and ``GET .../discussions/{num}``
* ``HEAD``/``GET /[{type}/]{repo}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, a quoted
  git-sha1 ``ETag``, ``Content-Length`` and single ``Range`` requests (206)

Errors carry the ``X-Error-Code`` header the client maps to exceptions (``RepoNotFound``,
``RevisionNotFound``, ``EntryNotFound``). A missing or private repo answers 401 to anonymous
callers and 404 to authenticated ones, as the Hub does. An unknown token gets 401 on any route.
Writes need a token whose user is the repo's namespace.

Limits: everything lives in memory and is lost on stop; no LFS or Xet uploads (files travel
base64-encoded inside the commit, so keep them to a few MB); no organizations, gated repos,
tags, commit history listing, discussions beyond PR creation, or pagination. A new repo starts
with an empty initial commit (no ``.gitattributes``). With ``hf_xet`` installed and Xet not
disabled (``HF_HUB_DISABLE_XET=1``), ``upload_folder`` takes its pipelined path: that works too,
but it retries a failed commit by itself, so ``fail_next_commits(1)`` does not surface as an error.

Fault injection for tests: ``fail_next_commits(n)`` and ``truncate_next_downloads(n)``; every
request is logged as ``(method, path, status)`` in ``requests`` (headers, hence tokens, are
never logged).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import itertools
import json
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["LocalHubServer", "RequestRecord", "main"]

_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_HEX_RE = re.compile(r"[0-9a-f]{7,40}")
_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")


def git_blob_sha(data: bytes) -> str:
    """The git object id of a blob; the Hub uses it as ETag and ``oid`` of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _true(value: Any) -> bool:
    return str(value).lower() in ("1", "true", "yes")


def _json_body(body: bytes) -> dict:
    try:
        data = json.loads(body) if body.strip() else {}
    except ValueError:
        raise HubError(400, "Request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise HubError(400, "Request body must be a JSON object")
    return data


class RequestRecord(NamedTuple):
    method: str
    path: str  # path and query string as sent by the client
    status: int


class HubError(Exception):
    """An HTTP error answer: status, message, and the ``X-Error-Code`` the client reads."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = dict(headers or {})


def _repo_not_found(user: str | None) -> HubError:
    return HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")


def _revision_not_found(rev: str) -> HubError:
    return HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")


@dataclass(frozen=True)
class Commit:
    sha: str
    parent: str | None
    title: str
    description: str
    files: dict[str, bytes]  # never mutated once the commit exists
    timestamp: float
    author: str


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    owner: str
    private: bool
    created_at: float
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # "main" or "refs/pr/N" -> commit sha
    prs: dict[int, dict] = field(default_factory=dict)  # num -> {"title", "author", "created"}


class HubStorage:
    """Repos, commits and refs, all in memory, guarded by one lock."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], Repo] = {}
        self._counter = itertools.count(1)

    def _new_commit(self, repo: Repo, parent: str | None, title: str, description: str,
                    files: dict[str, bytes], author: str) -> Commit:
        seed = f"{repo.repo_type}/{repo.repo_id}\n{parent}\n{title}\n{next(self._counter)}\n"
        h = hashlib.sha1(seed.encode())
        for path in sorted(files):
            h.update(f"{path}\0{git_blob_sha(files[path])}\n".encode())
        commit = Commit(h.hexdigest(), parent, title, description, files, time.time(), author)
        repo.commits[commit.sha] = commit
        return commit

    def create_repo(self, repo_type: str, repo_id: str, owner: str, private: bool) -> Repo | None:
        """Create a repo with an empty initial commit on ``main``; ``None`` if it exists."""
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                return None
            repo = Repo(repo_id, repo_type, owner, private, time.time())
            repo.refs["main"] = self._new_commit(repo, None, "initial commit", "", {}, owner).sha
            self.repos[(repo_type, repo_id)] = repo
            return repo

    def get(self, repo_type: str, repo_id: str, user: str | None, write: bool = False) -> Repo:
        with self.lock:
            repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and user != repo.owner):
            raise _repo_not_found(user)
        if write and user is None:
            raise HubError(401, "You must be authenticated to write to a repository")
        if write and user != repo.owner:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def resolve(self, repo: Repo, rev: str) -> Commit:
        """A branch, ``refs/heads/<branch>``, ``refs/pr/N`` or a (possibly short) commit sha."""
        with self.lock:
            name = rev[len("refs/heads/"):] if rev.startswith("refs/heads/") else rev
            if name in repo.refs:
                return repo.commits[repo.refs[name]]
            if _HEX_RE.fullmatch(rev):
                found = [c for sha, c in repo.commits.items() if sha.startswith(rev)]
                if len(found) == 1:
                    return found[0]
        raise _revision_not_found(rev)

    def commit(self, repo: Repo, rev: str, ops: list[tuple[str, str, bytes]], title: str, description: str,
               parent_commit: str | None, create_pr: bool, author: str) -> tuple[Commit, int | None]:
        """Apply ``ops`` on top of ``rev`` and move the ref; nothing changes if any op fails."""
        with self.lock:
            base = self.resolve(repo, rev)
            pr_num = None
            if create_pr:
                ref = None  # the PR ref is only created once the new tree is valid
            else:
                ref = rev[len("refs/heads/"):] if rev.startswith("refs/heads/") else rev
                if ref not in repo.refs:
                    raise HubError(400, f"Cannot commit to {rev}: not a branch or pull request ref")
            if parent_commit and not base.sha.startswith(parent_commit):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(base.files)
            for kind, path, data in ops:
                if kind == "file":
                    files[path] = data
                elif kind == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                else:  # deletedFolder
                    doomed = [p for p in files if p.startswith(path.rstrip("/") + "/")]
                    if not doomed:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in doomed:
                        del files[p]
            new = self._new_commit(repo, base.sha, title, description, files, author)
            if create_pr:
                pr_num = max(repo.prs, default=0) + 1
                repo.prs[pr_num] = {"title": title, "author": author, "created": new.timestamp}
                ref = f"refs/pr/{pr_num}"
            repo.refs[ref] = new.sha  # the atomic swap
            return new, pr_num

    def open_pr(self, repo: Repo, title: str, author: str) -> int:
        with self.lock:
            num = max(repo.prs, default=0) + 1
            repo.prs[num] = {"title": title, "author": author, "created": time.time()}
            repo.refs[f"refs/pr/{num}"] = repo.refs["main"]
            return num


def _tree_entry(path: str, commit: Commit) -> dict | None:
    """The tree-API entry of ``path`` in ``commit``: a file, a directory, or ``None``."""
    if path in commit.files:
        data = commit.files[path]
        return {"type": "file", "oid": git_blob_sha(data), "size": len(data), "path": path}
    prefix = path + "/"
    children = sorted((p, git_blob_sha(d)) for p, d in commit.files.items() if p.startswith(prefix))
    if not children and path:
        return None
    oid = hashlib.sha1(repr(children).encode()).hexdigest()
    return {"type": "directory", "oid": oid, "size": 0, "path": path}


def _last_commit(repo: Repo, commit: Commit, entry: dict) -> dict:
    """The newest ancestor of ``commit`` (inclusive) that changed ``entry``."""
    current = commit
    while current.parent is not None:
        parent = repo.commits[current.parent]
        before = _tree_entry(entry["path"], parent)
        if before is None or before["oid"] != entry["oid"]:
            break
        current = parent
    return {"id": current.sha, "title": current.title, "date": _iso(current.timestamp)}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every answer carries Content-Length
    server_version = "LocalHub/1.0"
    disable_nagle_algorithm = True
    timeout = 120  # close idle keep-alive connections eventually

    hub: LocalHubServer  # set in handle()

    def handle(self) -> None:
        self.hub = self.server.hub  # type: ignore[attr-defined]
        super().handle()

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        self.hub._record(getattr(self, "command", None) or "-", getattr(self, "path", "") or "", int(code))

    def log_message(self, format: str, *args: Any) -> None:  # silence stderr logging
        pass

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    # ------------------------------------------------------------------ plumbing
    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes, headers: dict | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _base(self) -> str:
        return f"http://{self.headers.get('Host') or self.hub.url.split('://', 1)[1]}"

    def _repo_url(self, repo: Repo) -> str:
        return f"{self._base()}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    def _dispatch(self) -> None:
        body = self._read_body()  # always, or the next request on this connection breaks
        url = urlsplit(self.path)
        segs = url.path.split("/")[1:]
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            user = self._user()
            self._route(segs, query, body, user)
        except HubError as err:
            headers = dict(err.headers)
            if err.code:
                headers["X-Error-Code"] = err.code
            headers["X-Error-Message"] = err.message.encode("ascii", "backslashreplace").decode()
            self._json({"error": err.message}, err.status, headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away mid-answer
        except Exception as err:  # a bug here should not kill the connection silently
            self._json({"error": f"Internal error: {type(err).__name__}: {err}"}, 500)

    def _user(self) -> str | None:
        auth = self.headers.get("Authorization")
        if not auth:
            return None
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else auth.strip()
        user = self.hub.tokens.get(token)
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    @staticmethod
    def _split_rev(segs: list[str]) -> tuple[str, list[str]]:
        """Take a revision off the front of raw path segments (it may be sent unencoded)."""
        if not segs or not segs[0]:
            raise HubError(400, "Missing revision")
        if segs[0] == "refs" and len(segs) >= 3:
            return "/".join(unquote(s) for s in segs[:3]), segs[3:]
        return unquote(segs[0]), segs[1:]

    # ------------------------------------------------------------------ routing
    def _route(self, segs: list[str], query: dict, body: bytes, user: str | None) -> None:
        method = self.command
        if segs[:2] == ["api", "whoami-v2"] and method == "GET":
            return self._whoami(user)
        if segs[:2] == ["api", "validate-yaml"] and method == "POST":
            return self._json({"errors": [], "warnings": []})
        if segs[:3] == ["api", "repos", "create"] and method == "POST":
            return self._create_repo(_json_body(body), user)
        if segs[:3] == ["api", "repos", "delete"] and method == "DELETE":
            return self._delete_repo(_json_body(body), user)
        if len(segs) >= 4 and segs[0] == "api" and segs[1] in _TYPES:
            return self._repo_api(_TYPES[segs[1]], f"{segs[2]}/{segs[3]}", segs[4:], query, body, user)
        repo_type = "model"
        if segs and segs[0] in _TYPES and len(segs) >= 4 and segs[3] == "resolve":
            repo_type, segs = _TYPES[segs[0]], segs[1:]
        if len(segs) >= 5 and segs[2] == "resolve" and method in ("GET", "HEAD"):
            rev, rest = self._split_rev(segs[3:])
            return self._resolve(repo_type, f"{segs[0]}/{segs[1]}", rev, unquote("/".join(rest)), user)
        raise HubError(404, f"Not found: {method} {urlsplit(self.path).path}")

    _WRITES = {("preupload", "POST"), ("commit", "POST"), ("settings", "PUT"), ("branch", "POST"),
               ("branch", "DELETE")}

    def _repo_api(self, repo_type: str, repo_id: str, rest: list[str], query: dict,
                  body: bytes, user: str | None) -> None:
        method, action = self.command, (rest[0] if rest else "")
        if (action, method) == ("commit", "POST") and self.hub._take_fault("commit"):
            raise HubError(500, "Injected commit failure (LocalHubServer.fail_next_commits)")
        repo = self.hub.storage.get(repo_type, repo_id, user, write=(action, method) in self._WRITES)
        if action in ("revision", "tree", "paths-info", "preupload", "commit"):
            rev, rest = self._split_rev(rest[1:])
        if (action, method) in (("", "GET"), ("revision", "GET")):
            return self._info(repo, rev if action else "main", query)
        if (action, method) == ("tree", "GET"):
            return self._tree(repo, rev, unquote("/".join(rest)).strip("/"), query)
        if (action, method) == ("paths-info", "POST"):
            return self._paths_info(repo, rev, body)
        if (action, method) == ("preupload", "POST"):
            return self._preupload(repo, rev, _json_body(body))
        if (action, method) == ("commit", "POST"):
            return self._commit(repo, rev, _true(query.get("create_pr")), body, user)
        if (action, method) == ("settings", "PUT"):
            return self._settings(repo, _json_body(body))
        if action == "branch" and method in ("POST", "DELETE"):
            return self._branch(repo, unquote("/".join(rest[1:])), _json_body(body))
        if (action, method, len(rest)) == ("discussions", "POST", 1):
            return self._open_pr(repo, _json_body(body), user)
        if (action, method, len(rest)) == ("discussions", "GET", 2) and rest[1].isdigit():
            return self._pr_details(repo, int(rest[1]))
        raise HubError(404, f"Not found: {method} {urlsplit(self.path).path}")

    # ------------------------------------------------------------------ endpoints
    def _whoami(self, user: str | None) -> None:
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        self._json({
            "type": "user", "id": f"local-{user}", "name": user, "fullname": user,
            "email": f"{user}@localhost", "emailVerified": True, "isPro": False, "canPay": False,
            "orgs": [], "avatarUrl": "",
            "auth": {"type": "access_token",
                     "accessToken": {"displayName": "local-hub", "role": "write", "createdAt": _iso(0)}},
        })

    def _create_repo(self, data: dict, user: str | None) -> None:
        if user is None:
            raise HubError(401, "You must be authenticated to create a repository")
        name, namespace = data.get("name") or "", data.get("organization") or user
        repo_type = data.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise HubError(400, f"Invalid repo type: {repo_type}")
        if not _NAME_RE.fullmatch(name) or "--" in name or ".." in name:
            raise HubError(400, f"Invalid repo name: {name!r}")
        if namespace != user:
            raise HubError(403, f"You don't have the rights to create a repo in namespace {namespace!r}")
        private = data.get("visibility") == "private" if "visibility" in data else bool(data.get("private"))
        repo_id = f"{namespace}/{name}"
        repo = self.hub.storage.create_repo(repo_type, repo_id, user, private)
        if repo is None:
            # `create_repo(exist_ok=True)` swallows a 409; the body carries the repo url, as on the Hub.
            message = f"You already created this {repo_type} repo"
            url = f"{self._base()}/{_URL_PREFIX[repo_type]}{repo_id}"
            return self._json({"error": message, "url": url}, 409, {"X-Error-Message": message})
        self._json({"url": self._repo_url(repo), "name": repo_id, "id": repo_id})

    def _delete_repo(self, data: dict, user: str | None) -> None:
        repo_id = f"{data.get('organization') or user}/{data.get('name')}"
        repo = self.hub.storage.get(data.get("type") or "model", repo_id, user, write=True)
        with self.hub.storage.lock:
            self.hub.storage.repos.pop((repo.repo_type, repo.repo_id), None)
        self._json({})

    def _info(self, repo: Repo, rev: str, query: dict) -> None:
        commit = self.hub.storage.resolve(repo, rev)
        siblings = []
        for path in sorted(commit.files):
            sibling: dict[str, Any] = {"rfilename": path}
            if _true(query.get("blobs")):
                sibling.update(size=len(commit.files[path]), blobId=git_blob_sha(commit.files[path]))
            siblings.append(sibling)
        self._json({
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
            "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0], "sha": commit.sha,
            "lastModified": _iso(commit.timestamp), "createdAt": _iso(repo.created_at),
            "private": repo.private, "gated": False, "disabled": False, "downloads": 0, "likes": 0,
            "tags": [], "siblings": siblings,
        })

    def _tree(self, repo: Repo, rev: str, path: str, query: dict) -> None:
        commit = self.hub.storage.resolve(repo, rev)
        root = _tree_entry(path, commit)
        if root is None or root["type"] == "file":
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        prefix = path + "/" if path else ""
        wanted: set[str] = set()
        for file_path in commit.files:
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix):].split("/")
            depth = len(parts) if _true(query.get("recursive")) else 1
            wanted.update(prefix + "/".join(parts[:i]) for i in range(1, depth + 1))
        entries = [_tree_entry(p, commit) for p in sorted(wanted)]
        if _true(query.get("expand")):
            for entry in entries:
                entry["lastCommit"] = _last_commit(repo, commit, entry)
        self._json(entries)

    def _paths_info(self, repo: Repo, rev: str, body: bytes) -> None:
        commit = self.hub.storage.resolve(repo, rev)
        if self.headers.get("Content-Type", "").startswith("application/json"):
            data = _json_body(body)
            paths, expand = data.get("paths") or [], _true(data.get("expand"))
        else:
            form = parse_qs(body.decode())
            paths, expand = form.get("paths", []), _true((form.get("expand") or ["false"])[-1])
        entries = [e for e in (_tree_entry(p.strip("/"), commit) for p in paths if p.strip("/")) if e]
        if expand:
            for entry in entries:
                entry["lastCommit"] = _last_commit(repo, commit, entry)
        self._json(entries)

    def _preupload(self, repo: Repo, rev: str, data: dict) -> None:
        commit = self.hub.storage.resolve(repo, rev)
        files = []
        for item in data.get("files") or []:
            existing = commit.files.get(item.get("path", ""))
            files.append({"path": item.get("path", ""), "uploadMode": "regular", "shouldIgnore": False,
                          "oid": git_blob_sha(existing) if existing is not None else None})
        self._json({"files": files, "commitOid": commit.sha})

    def _commit(self, repo: Repo, rev: str, create_pr: bool, body: bytes, user: str | None) -> None:
        header: dict = {}
        ops: list[tuple[str, str, bytes]] = []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = _json_body(line)
            key, value = item.get("key"), item.get("value") or {}
            if key == "header":
                header = value
                continue
            path = str(value.get("path", ""))
            if key in ("deletedFile", "deletedFolder"):
                ops.append((key, path.strip("/"), b""))
            elif key == "file":
                content = value.get("content", "")
                data = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                ops.append(("file", path, data))
            elif key == "lfsFile":
                raise HubError(400, "LFS files are not supported by this local hub (uploads are 'regular')")
            else:
                raise HubError(400, f"Unknown commit operation: {key!r}")
            parts = path.strip("/").split("/")
            if path.startswith("/") or parts[0] == ".git" or any(p in ("", ".", "..") for p in parts):
                raise HubError(400, f"Invalid path in repo: {path!r}")
        if not header.get("summary"):
            raise HubError(400, "Missing commit summary")
        commit, pr_num = self.hub.storage.commit(
            repo, rev, ops, header["summary"], header.get("description") or "", header.get("parentCommit"),
            create_pr, user or "")
        self._json({
            "success": True, "commitOid": commit.sha,
            "commitUrl": f"{self._repo_url(repo)}/commit/{commit.sha}",
            "commitMessage": commit.title, "hookOutput": "",
            "pullRequestUrl": f"{self._repo_url(repo)}/discussions/{pr_num}" if pr_num else None,
        })

    def _settings(self, repo: Repo, data: dict) -> None:
        if "visibility" in data:
            repo.private = data["visibility"] == "private"
        elif "private" in data:
            repo.private = bool(data["private"])
        self._json({})

    def _branch(self, repo: Repo, branch: str, data: dict) -> None:
        storage = self.hub.storage
        with storage.lock:
            if self.command == "DELETE":
                if branch == "main" or branch not in repo.refs:
                    raise HubError(400 if branch == "main" else 404, f"Cannot delete branch {branch!r}",
                                   None if branch == "main" else "RevisionNotFound")
                del repo.refs[branch]
            else:
                if branch in repo.refs:
                    raise HubError(409, f"Reference already exists: {branch}")
                if not branch or branch.startswith("refs/") or _HEX_RE.fullmatch(branch):
                    raise HubError(400, f"Invalid branch name: {branch!r}")
                repo.refs[branch] = storage.resolve(repo, data.get("startingPoint") or "main").sha
        self._json({})

    def _open_pr(self, repo: Repo, data: dict, user: str | None) -> None:
        if user is None:
            raise HubError(401, "You must be authenticated to open a pull request")
        if not data.get("pullRequest"):
            raise HubError(400, "Only pull requests are supported by this local hub")
        num = self.hub.storage.open_pr(repo, data.get("title") or "", user)
        self._json({"num": num, "url": f"{self._repo_url(repo)}/discussions/{num}", "pullRequest": True})

    def _pr_details(self, repo: Repo, num: int) -> None:
        pr = repo.prs.get(num)
        if pr is None:
            raise HubError(404, f"Discussion {num} not found")
        self._json({
            "num": num, "title": pr["title"], "author": {"name": pr["author"]},
            "createdAt": _iso(pr["created"]),
            "status": "open", "isPullRequest": True, "repo": {"name": repo.repo_id, "type": repo.repo_type},
            "events": [], "changes": {"base": "refs/heads/main"}, "filesWithConflicts": [], "diff": "",
        })

    def _resolve(self, repo_type: str, repo_id: str, rev: str, path: str, user: str | None) -> None:
        repo = self.hub.storage.get(repo_type, repo_id, user)
        commit = self.hub.storage.resolve(repo, rev)
        data = commit.files.get(path)
        if data is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{git_blob_sha(data)}"', "Accept-Ranges": "bytes"}
        status, start, end = 200, 0, len(data)
        match = _RANGE_RE.fullmatch(self.headers.get("Range", "").replace(" ", ""))
        if match and (match[1] or match[2]):
            if match[1]:
                start, end = int(match[1]), min(int(match[2]) + 1 if match[2] else len(data), len(data))
            else:
                start = max(len(data) - int(match[2]), 0)
            if start >= len(data) or start >= end:
                raise HubError(416, "Range not satisfiable",
                               headers={"Content-Range": f"bytes */{len(data)}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        part = data[start:end]
        if self.command == "GET" and self.hub._take_fault("download"):
            # Promise the whole body, send half of it, then hang up.
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(part)))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(part[: len(part) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self._send(status, part, headers, "application/octet-stream")


class LocalHubServer:
    """An in-memory Hub API server on ``http://<host>:<port>`` (see the module docstring).

    ``tokens`` maps bearer tokens to user names; a user owns the namespace of the same name.
    """

    def __init__(self, tokens: dict[str, str] | None = None, host: str = "127.0.0.1", port: int = 0):
        self.tokens: dict[str, str] = dict(tokens or {})
        self.host, self.port = host, port
        self.storage = HubStorage()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._faults = {"commit": 0, "download": 0}
        self._log: list[RequestRecord] = []

    # -- lifecycle
    def start(self) -> LocalHubServer:
        if self._httpd is not None:
            return self
        httpd = ThreadingHTTPServer((self.host, self.port), _Handler)
        httpd.daemon_threads = True
        httpd.hub = self  # type: ignore[attr-defined]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="local-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> LocalHubServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("LocalHubServer is not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    # -- fault injection and request log
    def fail_next_commits(self, n: int = 1) -> None:
        """Answer 500 to the next ``n`` commit requests (body read, repo untouched)."""
        with self._lock:
            self._faults["commit"] += n

    def truncate_next_downloads(self, n: int = 1) -> None:
        """Cut the next ``n`` GET resolve answers after half the promised bytes."""
        with self._lock:
            self._faults["download"] += n

    def _take_fault(self, kind: str) -> bool:
        with self._lock:
            if self._faults[kind] > 0:
                self._faults[kind] -= 1
                return True
            return False

    def _record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self._log.append(RequestRecord(method, path, status))

    @property
    def requests(self) -> list[RequestRecord]:
        """A copy of the request log, oldest first."""
        with self._lock:
            return list(self._log)

    def clear_requests(self) -> None:
        with self._lock:
            self._log.clear()

    # -- test helpers
    def _repo(self, repo_id: str, repo_type: str) -> Repo:
        with self.storage.lock:
            repo = self.storage.repos.get((repo_type, repo_id))
        if repo is None:
            raise KeyError(f"No such {repo_type} repo: {repo_id}")
        return repo

    def repo_files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """The files of ``repo_id`` at ``revision``, as ``{path: content}``."""
        return dict(self.storage.resolve(self._repo(repo_id, repo_type), revision).files)

    def commit_sha(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        """The commit sha that ``revision`` points to."""
        return self.storage.resolve(self._repo(repo_id, repo_type), revision).sha


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve an in-memory Hugging Face Hub API (tests, demos).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--token", action="append", default=[], metavar="TOKEN:USER",
                        help="accept TOKEN as user USER (repeatable); default hf_local_token:user")
    args = parser.parse_args(argv)
    tokens = {}
    for item in args.token or ["hf_local_token:user"]:
        token, sep, user = item.partition(":")
        if not sep or not token or not user:
            parser.error(f"--token expects TOKEN:USER, got {item!r}")
        tokens[token] = user
    server = LocalHubServer(tokens=tokens, host=args.host, port=args.port).start()
    print(f"Local Hub listening on {server.url}", flush=True)
    print(f"Users: {', '.join(sorted(set(tokens.values())))}. Use HF_ENDPOINT={server.url} "
          "(or endpoint=...) and HF_HUB_DISABLE_XET=1. Ctrl-C stops.", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
