"""A small in-memory Hugging Face Hub that listens on 127.0.0.1, for offline tests.

It speaks the part of the Hub HTTP API that the real ``huggingface_hub`` 2.4 client (and
``transformers`` on top of it) uses to push and load a model repository:

- ``GET /api/whoami-v2``: who the token belongs to
- ``GET /api/agent-harnesses``: the client's user-agent registry (empty)
- ``POST /api/repos/create``: create a model repo (409 if it exists)
- ``POST /api/validate-yaml``: README.md metadata check
- ``POST /api/models/{repo}/branch/{branch}``: create a branch (409 if it exists)
- ``POST /api/models/{repo}/preupload/{rev}``: regular-or-LFS decision per file
- ``POST /{repo}.git/info/lfs/objects/batch``: LFS batch API ("basic" transfer)
- ``PUT /_lfs/{repo}/upload/{oid}``, ``POST /_lfs/{repo}/verify``: LFS object storage (per repo)
- ``POST /api/models/{repo}/commit/{rev}``: NDJSON commit (base64 files, LFS pointers, deletions)
- ``GET /api/models/{repo}[/revision/{rev}]``: model info (siblings, sha, cardData)
- ``GET /api/models/{repo}/tree/{rev}[/{path}]``: tree listing (``recursive``)
- ``GET|HEAD /{repo}/resolve/{rev}/{path}``: file download with ETag, X-Repo-Commit,
  Content-Length, X-Linked-Etag/-Size (LFS files) and Range

Dataset repositories take the same routes with ``/api/datasets/`` for ``/api/models/`` and a
``/datasets/`` prefix on the others (as on the Hub); they are stored under ``datasets/{repo_id}``
(``hub.files(repo_id, repo_type="dataset")``).

There is no Xet storage: clients must run with ``HF_HUB_DISABLE_XET=1`` so that large or binary
files take the LFS path. Like the real Hub, ``*.safetensors`` (and any binary or >= 10 MB file) is
stored through LFS, everything else as a regular git blob sent base64-encoded inside the commit.

Writes need ``Authorization: Bearer <token>``; reads of public repos do not. Requests to routes this
server does not implement are answered 404 and recorded in :attr:`LoopbackHub.unhandled`, so a test
can assert that the client needed nothing else. :meth:`LoopbackHub.fail` makes chosen routes answer
an error status, for error-path tests.

Usage::

    with LoopbackHub(token="hf_test") as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": "hf_test"}
        ...
        hub.files("tester/model")  # {path: bytes} at the head of main
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import parse_qs, unquote, urlsplit

import yaml
from typing_extensions import Self

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".npz")
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
DEFAULT_GITATTRIBUTES = b"".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n".encode() for suffix in LFS_SUFFIXES)


def git_blob_oid(content: bytes) -> str:
    """Git object id of a blob (sha1 of ``b"blob <size>\\0" + content``), as the Hub reports it."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class StoredFile:
    """One file of a commit: its bytes and whether it is stored through LFS."""

    content: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def oid(self) -> str:
        """The oid the Hub reports: sha256 for LFS files, git blob sha1 for regular files."""
        return self.sha256 if self.lfs else git_blob_oid(self.content)


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, StoredFile]
    parent: str | None
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        """Commit for a branch name or a (full) commit oid; None when unknown."""
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        return self.commits.get(revision)


@dataclass
class _Failure:
    status: int
    routes: set[str] | None  # None: every route
    remaining: int | None  # None: until cleared
    message: str


class HubError(Exception):
    """Raised inside a route handler; turned into an error response with Hub-style headers."""

    def __init__(
        self,
        status: int,
        message: str,
        error_code: str | None = None,
        headers: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.headers = headers or {}
        self.body = body or {}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _front_matter(readme: bytes) -> Any:
    """YAML metadata block of a README (None when there is none); raises yaml.YAMLError."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", readme.decode("utf-8"), re.DOTALL)
    return yaml.safe_load(match.group(1)) if match else None


def _metadata_errors(metadata: Any) -> list[str]:
    """A few of the checks the Hub runs on model card metadata."""
    if metadata is None:
        return []
    if not isinstance(metadata, dict):
        return ["metadata must be a YAML mapping"]
    errors = []
    for key in ("license", "library_name", "pipeline_tag"):
        if key in metadata and not isinstance(metadata[key], str):
            errors.append(f'"{key}" must be a string')
    for key in ("tags", "datasets"):
        value = metadata.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            errors.append(f'"{key}" must be a list of strings')
    base_model = metadata.get("base_model")
    if base_model is not None and not isinstance(base_model, (str, list)):
        errors.append('"base_model" must be a string or a list of strings')
    model_index = metadata.get("model-index")
    if model_index is not None:
        if not isinstance(model_index, list):
            return errors + ['"model-index" must be a list']
        for entry in model_index:
            if not isinstance(entry, dict) or "name" not in entry or not isinstance(entry.get("results"), list):
                errors.append('"model-index" entries need "name" and a "results" list')
                continue
            for result in entry["results"]:
                task = result.get("task") if isinstance(result, dict) else None
                dataset = result.get("dataset") if isinstance(result, dict) else None
                metrics = result.get("metrics") if isinstance(result, dict) else None
                if not isinstance(task, dict) or "type" not in task:
                    errors.append('"model-index" results need task.type')
                if not isinstance(dataset, dict) or "type" not in dataset or "name" not in dataset:
                    errors.append('"model-index" results need dataset.type and dataset.name')
                if not isinstance(metrics, list) or not all(
                    isinstance(m, dict) and "type" in m and isinstance(m.get("value"), (int, float)) for m in metrics
                ):
                    errors.append('"model-index" metrics need a type and a numeric value')
    return errors


class LoopbackHub:
    """An in-memory Hub served on ``127.0.0.1`` at a random port by a background thread.

    Args:
        token: the only token accepted for writes (and for reads of private repos).
        user: the account name that token belongs to (``whoami``).
    """

    def __init__(self, token: str = "hf_loopback_test_token", user: str = "tester") -> None:
        self.token = token
        self.user = user
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[tuple[str, str], bytes] = {}  # (repo_id, sha256) -> content
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self.unhandled: list[str] = []
        self._failures: list[_Failure] = []
        self._lock = threading.RLock()
        self._commit_counter = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        """Base URL to put in ``HF_ENDPOINT``, e.g. ``http://127.0.0.1:53211``."""
        if self._server is None:
            raise RuntimeError("LoopbackHub is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> Self:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="loopback-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- test helpers
    def fail(
        self,
        status: int,
        routes: str | list[str] | None = None,
        times: int | None = None,
        message: str = "Injected failure",
    ) -> None:
        """Answer ``status`` on the named routes (None: all) for ``times`` requests (None: always).

        Route names: whoami, agent_harnesses, create_repo, validate_yaml, create_branch, preupload,
        lfs_batch, lfs_upload, lfs_verify, commit, model_info, tree, resolve.
        """
        route_set = {routes} if isinstance(routes, str) else (set(routes) if routes is not None else None)
        with self._lock:
            self._failures.append(_Failure(status, route_set, times, message))

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """Every file of ``repo_id`` (a ``"model"`` or ``"dataset"`` repository) at ``revision`` as ``{path: bytes}``."""
        key = repo_id if repo_type == "model" else f"datasets/{repo_id}"
        with self._lock:
            commit = self.repos[key].resolve(revision)
            if commit is None:
                raise KeyError(revision)
            return {path: stored.content for path, stored in commit.files.items()}

    def commit_messages(self, repo_id: str, revision: str = "main") -> list[str]:
        """Commit summaries from the head of ``revision`` back to the initial commit."""
        with self._lock:
            repo = self.repos[repo_id]
            commit = repo.resolve(revision)
            messages = []
            while commit is not None:
                messages.append(commit.message)
                commit = repo.commits.get(commit.parent) if commit.parent else None
            return messages

    # ----------------------------------------------------------------- used by the handler
    def _take_failure(self, route: str) -> _Failure | None:
        with self._lock:
            for failure in self._failures:
                if failure.routes is None or route in failure.routes:
                    if failure.remaining is not None:
                        failure.remaining -= 1
                        if failure.remaining <= 0:
                            self._failures.remove(failure)
                    return failure
        return None

    def _new_commit(self, repo: Repo, branch: str, message: str, files: dict[str, StoredFile]) -> Commit:
        with self._lock:
            self._commit_counter += 1
            parent = repo.branches.get(branch)
            seed = f"{repo.repo_id}\n{parent}\n{message}\n{self._commit_counter}\n" + "\n".join(
                f"{path}:{stored.oid}" for path, stored in sorted(files.items())
            )
            oid = hashlib.sha1(seed.encode()).hexdigest()
            commit = Commit(oid=oid, message=message, files=files, parent=parent, date=_now())
            repo.commits[oid] = commit
            repo.branches[branch] = oid
            return commit


class _Handler(BaseHTTPRequestHandler):
    """Routes one request to the matching ``LoopbackHub`` behaviour."""

    hub: LoopbackHub
    protocol_version = "HTTP/1.1"

    _REPO = r"(?P<repo>[^/]+/[^/]+)"
    ROUTES: ClassVar[list[tuple[str, str, str, str]]] = [
        # (method, path regex, route name, handler method)
        ("GET", r"/api/whoami-v2", "whoami", "_whoami"),
        ("GET", r"/api/agent-harnesses", "agent_harnesses", "_agent_harnesses"),
        ("POST", r"/api/repos/create", "create_repo", "_create_repo"),
        ("POST", r"/api/validate-yaml", "validate_yaml", "_validate_yaml"),
        (
            "POST",
            rf"/api/models/{_REPO}/branch/(?P<branch>[^/]+)",
            "create_branch",
            "_create_branch",
        ),
        ("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", "preupload", "_preupload"),
        ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", "lfs_batch", "_lfs_batch"),
        ("PUT", rf"/_lfs/{_REPO}/upload/(?P<oid>[0-9a-f]{{64}})", "lfs_upload", "_lfs_upload"),
        ("POST", rf"/_lfs/{_REPO}/verify", "lfs_verify", "_lfs_verify"),
        ("POST", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", "commit", "_commit"),
        ("GET", rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree", "_tree"),
        ("GET", rf"/api/models/{_REPO}/revision/(?P<rev>[^/]+)", "model_info", "_model_info"),
        ("GET", rf"/api/models/{_REPO}", "model_info", "_model_info"),
        ("GET", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve", "_resolve"),
        ("HEAD", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve", "_resolve"),
    ]

    # ----------------------------------------------------------------- plumbing
    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output quiet; see hub.requests instead

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        self.query = {key: values[-1] for key, values in parse_qs(split.query).items()}
        self.body = self._read_body() if method in ("POST", "PUT") else b""
        # a dataset repository: the model routes, on the repository key "datasets/{repo_id}"
        path, prefix = split.path, ""
        for dataset_form, model_form in (("/api/datasets/", "/api/models/"), ("/_lfs/datasets/", "/_lfs/"),
                                         ("/datasets/", "/")):
            if path.startswith(dataset_form):
                path, prefix = model_form + path[len(dataset_form):], "datasets/"
                break
        for route_method, pattern, route, handler_name in self.ROUTES:
            match = re.fullmatch(pattern, path)
            if route_method != method or match is None:
                continue
            params = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
            if "repo" in params:
                params["repo"] = prefix + params["repo"]
            try:
                failure = self.hub._take_failure(route)
                if failure is not None:
                    raise HubError(failure.status, failure.message)
                status, headers, body = getattr(self, handler_name)(**params)
            except HubError as error:
                status = error.status
                headers = {"X-Error-Message": error.message, **error.headers}
                if error.error_code:
                    headers["X-Error-Code"] = error.error_code
                body = json.dumps({"error": error.message, **error.body}).encode()
                headers.setdefault("Content-Type", "application/json")
            self._respond(method, status, headers, body)
            return
        self.hub.unhandled.append(f"{method} {self.path}")
        self._respond(
            method,
            404,
            {"Content-Type": "application/json"},
            json.dumps({"error": f"not implemented by the loopback hub: {method} {split.path}"}).encode(),
        )

    def _respond(self, method: str, status: int, headers: dict[str, str], body: bytes) -> None:
        self.hub.requests.append((method, self.path, status))
        self.send_response(status)
        headers = dict(headers)
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(body)

    @staticmethod
    def _json(payload: Any, status: int = 200) -> tuple[int, dict[str, str], bytes]:
        return status, {"Content-Type": "application/json"}, json.dumps(payload).encode()

    def _json_body(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except json.JSONDecodeError as error:
            raise HubError(400, f"Invalid JSON body: {error}") from None

    # ----------------------------------------------------------------- auth and lookups
    def _authenticated(self) -> bool:
        header = self.headers.get("Authorization", "")
        if not header:
            return False
        if header != f"Bearer {self.hub.token}":
            raise HubError(401, "Invalid credentials in Authorization header")
        return True

    def _require_auth(self) -> None:
        if not self._authenticated():
            raise HubError(401, "You must be authenticated to access this resource")

    def _repo(self, repo_id: str, write: bool = False) -> Repo:
        authenticated = self._authenticated()
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and not authenticated):
            raise HubError(404 if authenticated else 401, "Repository not found", "RepoNotFound")
        if write:
            if not authenticated:
                raise HubError(401, "You must be authenticated to write to this repository")
            if repo_id.removeprefix("datasets/").split("/")[0] != self.hub.user:
                raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _commit_at(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    # ----------------------------------------------------------------- routes
    def _whoami(self) -> tuple[int, dict[str, str], bytes]:
        self._require_auth()
        return self._json(
            {
                "type": "user",
                "id": "0" * 24,
                "name": self.hub.user,
                "fullname": "Loopback Tester",
                "orgs": [],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "tests", "role": "write"},
                },
            }
        )

    def _agent_harnesses(self) -> tuple[int, dict[str, str], bytes]:
        # Registry the client fetches once a day to tag its user agent; empty here.
        return self._json({"standardEnvVars": [], "harnesses": {}})

    def _create_repo(self) -> tuple[int, dict[str, str], bytes]:
        self._require_auth()
        payload = self._json_body()
        repo_type = payload.get("type", "model")
        if repo_type not in ("model", "dataset"):
            raise HubError(400, "The loopback hub only hosts model and dataset repositories")
        namespace = payload.get("organization") or self.hub.user
        if namespace != self.hub.user:
            raise HubError(403, f"You don't have the rights to create a {repo_type} under the namespace {namespace}")
        repo_id = f"{namespace}/{payload['name']}" if repo_type == "model" else f"datasets/{namespace}/{payload['name']}"
        url = f"{self.hub.url}/{repo_id}"
        with self.hub._lock:
            if repo_id in self.hub.repos:
                raise HubError(409, "You already created this model repo", body={"url": url})
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            repo = Repo(repo_id=repo_id, private=private, created_at=_now())
            self.hub.repos[repo_id] = repo
            self.hub._new_commit(
                repo,
                "main",
                "initial commit",
                {".gitattributes": StoredFile(DEFAULT_GITATTRIBUTES, lfs=False)},
            )
        return self._json({"url": url, "name": repo_id.removeprefix("datasets/"), "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    def _validate_yaml(self) -> tuple[int, dict[str, str], bytes]:
        payload = self._json_body()
        try:
            metadata = _front_matter(payload.get("content", "").encode())
        except yaml.YAMLError as error:
            return self._json({"errors": [{"message": f"Invalid YAML: {error}"}]}, status=400)
        errors = _metadata_errors(metadata)
        if errors:
            return self._json({"errors": [{"message": message} for message in errors]}, status=400)
        warnings = [] if metadata else [{"message": "Empty or missing yaml metadata in repo card"}]
        return self._json({"errors": [], "warnings": warnings})

    def _create_branch(self, repo: str, branch: str) -> tuple[int, dict[str, str], bytes]:
        repository = self._repo(repo, write=True)
        payload = self._json_body()
        with self.hub._lock:
            if branch in repository.branches:
                raise HubError(409, f"Branch {branch} already exists")
            start = self._commit_at(repository, payload.get("startingPoint") or "main")
            repository.branches[branch] = start.oid
        return self._json({})

    def _preupload(self, repo: str, rev: str) -> tuple[int, dict[str, str], bytes]:
        repository = self._repo(repo, write=True)
        commit = self._commit_at(repository, rev) if self.query.get("create_pr") != "1" else None
        files = []
        for item in self._json_body().get("files", []):
            sample = base64.b64decode(item.get("sample", ""))
            is_lfs = item["path"].endswith(LFS_SUFFIXES) or item.get("size", 0) >= LFS_SIZE_THRESHOLD or b"\0" in sample
            existing = commit.files.get(item["path"]) if commit is not None else None
            files.append(
                {
                    "path": item["path"],
                    "uploadMode": "lfs" if is_lfs else "regular",
                    "shouldIgnore": False,
                    "oid": existing.oid if existing is not None else None,
                }
            )
        return self._json({"files": files, "commitOid": commit.oid if commit else None})

    def _lfs_batch(self, repo: str) -> tuple[int, dict[str, str], bytes]:
        self._repo(repo, write=True)
        payload = self._json_body()
        if payload.get("operation") != "upload":
            raise HubError(400, "The loopback hub only supports LFS uploads")
        objects = []
        for item in payload.get("objects", []):
            entry: dict[str, Any] = {
                "oid": item["oid"],
                "size": item["size"],
                "authenticated": True,
            }
            if (repo, item["oid"]) not in self.hub.lfs_objects:
                entry["actions"] = {
                    "upload": {"href": f"{self.hub.url}/_lfs/{repo}/upload/{item['oid']}", "header": {}},
                    "verify": {"href": f"{self.hub.url}/_lfs/{repo}/verify", "header": {}},
                }
            objects.append(entry)
        return self._json({"transfer": "basic", "objects": objects})

    def _lfs_upload(self, repo: str, oid: str) -> tuple[int, dict[str, str], bytes]:
        # Like a pre-signed storage URL: no Authorization header is sent or needed.
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, "Uploaded content does not match its sha256 oid")
        with self.hub._lock:
            self.hub.lfs_objects[repo, oid] = self.body
        return 200, {"ETag": f'"{secrets.token_hex(8)}"'}, b""

    def _lfs_verify(self, repo: str) -> tuple[int, dict[str, str], bytes]:
        payload = self._json_body()
        stored = self.hub.lfs_objects.get((repo, payload.get("oid", "")))
        if stored is None or len(stored) != payload.get("size"):
            raise HubError(404, "LFS object not found")
        return self._json({"success": True})

    def _commit(self, repo: str, rev: str) -> tuple[int, dict[str, str], bytes]:
        repository = self._repo(repo, write=True)
        if self.query.get("create_pr") == "1":
            raise HubError(400, "The loopback hub does not support pull requests")
        if rev not in repository.branches:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        lines = [json.loads(line) for line in self.body.decode("utf-8").splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "Commit payload must start with a header line")
        header = lines[0]["value"]
        with self.hub._lock:
            parent = repository.commits[repository.branches[rev]]
            if header.get("parentCommit") and header["parentCommit"] != parent.oid:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(parent.files)
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise HubError(400, "Only base64-encoded files are supported")
                    files[value["path"]] = StoredFile(base64.b64decode(value["content"]), lfs=False)
                elif key == "lfsFile":
                    content = self.hub.lfs_objects.get((repo, value["oid"]))
                    if content is None:
                        raise HubError(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                    files[value["path"]] = StoredFile(content, lfs=True)
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    for path in [p for p in files if p.startswith(prefix)]:
                        del files[path]
                else:
                    raise HubError(400, f"Unsupported commit operation {key!r}")
            commit = self.hub._new_commit(repository, rev, header.get("summary", ""), files)
        return self._json(
            {
                "success": True,
                "commitOid": commit.oid,
                "pullRequestUrl": None,
                "commitUrl": f"{self.hub.url}/{repo}/commit/{commit.oid}",
            }
        )

    def _model_info(self, repo: str, rev: str = "main") -> tuple[int, dict[str, str], bytes]:
        repository = self._repo(repo)
        commit = self._commit_at(repository, rev)
        card_data = None
        if "README.md" in commit.files:
            try:
                card_data = _front_matter(commit.files["README.md"].content)
            except yaml.YAMLError:
                card_data = None
        with_blobs = self.query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path, stored in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                sibling.update(size=len(stored.content), blobId=git_blob_oid(stored.content))
                if stored.lfs:
                    sibling["lfs"] = {
                        "size": len(stored.content),
                        "sha256": stored.sha256,
                        "pointerSize": 134,
                    }
            siblings.append(sibling)
        card = card_data if isinstance(card_data, dict) else {}
        return self._json(
            {
                "_id": hashlib.sha1(repo.encode()).hexdigest()[:24],
                "id": repo,
                "modelId": repo,
                "author": repo.split("/")[0],
                "sha": commit.oid,
                "lastModified": commit.date,
                "createdAt": repository.created_at,
                "private": repository.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": card.get("tags", []),
                "pipeline_tag": card.get("pipeline_tag"),
                "library_name": card.get("library_name"),
                "cardData": card_data if isinstance(card_data, dict) else None,
                "siblings": siblings,
            }
        )

    def _tree(self, repo: str, rev: str, path: str = "") -> tuple[int, dict[str, str], bytes]:
        repository = self._repo(repo)
        commit = self._commit_at(repository, rev)
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        entries: dict[str, dict[str, Any]] = {}
        for file_path, stored in sorted(commit.files.items()):
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix) :].split("/")
            # folders on the way down (all of them when recursive, only the first level otherwise)
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                folder = prefix + "/".join(parts[:depth])
                entries.setdefault(
                    folder,
                    {
                        "type": "directory",
                        "oid": hashlib.sha1(folder.encode()).hexdigest(),
                        "size": 0,
                        "path": folder,
                    },
                )
            if recursive or len(parts) == 1:
                entry: dict[str, Any] = {
                    "type": "file",
                    "oid": git_blob_oid(stored.content),
                    "size": len(stored.content),
                    "path": file_path,
                }
                if stored.lfs:
                    entry["lfs"] = {
                        "oid": stored.sha256,
                        "size": len(stored.content),
                        "pointerSize": 134,
                    }
                entries[file_path] = entry
        if prefix and not entries:
            raise HubError(404, f"{path} does not exist on {rev}", "EntryNotFound")
        return self._json(list(entries.values()))

    def _resolve(self, repo: str, rev: str, path: str) -> tuple[int, dict[str, str], bytes]:
        repository = self._repo(repo)
        commit = self._commit_at(repository, rev)
        stored = commit.files.get(path)
        if stored is None:
            raise HubError(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": commit.oid})
        headers = {
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{stored.oid}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if stored.lfs:
            headers["X-Linked-Etag"] = f'"{stored.sha256}"'
            headers["X-Linked-Size"] = str(len(stored.content))
        body = stored.content
        range_match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if range_match:
            start = int(range_match.group(1))
            end = int(range_match.group(2)) if range_match.group(2) else len(body) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(body)}"
            return 206, headers, body[start : end + 1]
        return 200, headers, body
