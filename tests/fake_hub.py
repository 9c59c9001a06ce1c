"""A Hugging Face hub on 127.0.0.1 for the tests: the few endpoints huggingface_hub's downloads, listings, repo
creation and commits use, over repos held in memory, recording every request and every commit it receives.

Served (huggingface_hub 2.x's protocol; `<type>s` is models or datasets, a dataset's resolve URLs start /datasets/):
  GET  /api/<type>s/<org>/<name>[/revision/<rev>]       repo info: id, sha, siblings, private
  GET  /api/<type>s/<org>/<name>/tree/<rev>[/<path>]    files and folders (?recursive=true), one page
  HEAD|GET [/datasets]/<org>/<name>/resolve/<rev>/<path> a file: X-Repo-Commit, ETag, X-Linked-Etag/-Size, Range
  POST /api/repos/create                                 a new empty repo (409 when it exists)
  POST /api/validate-yaml                                a README.md's metadata: always valid
  POST /api/<type>s/<org>/<name>/preupload/<rev>         every file "regular" (its bytes travel in the commit)
  POST /api/<type>s/<org>/<name>/commit/<rev>            NDJSON: header, then file / deletedFile lines
Errors carry X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound) as the real hub's do, and a private
repo answers 401 to a request without its token.
"""
import base64
import hashlib
import http.server
import json
import re
import threading
import urllib.parse


def commit_sha(parent: str, files: dict) -> str:
  digest = hashlib.sha1(parent.encode())
  for path in sorted(files):
    digest.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
  return digest.hexdigest()


class Repo:
  """A repo's commits (each a full {path: bytes} tree) and its branches."""

  def __init__(self, files: dict, private_token: str | None = None):
    self.commits = {}  # sha -> {path: bytes}
    self.refs = {}
    self.private_token = private_token
    self.add_commit(files, "main")

  def add_commit(self, files: dict, branch: str = "main") -> str:
    parent = self.refs.get(branch, "")
    sha = commit_sha(parent, files)
    self.commits[sha] = dict(files)
    self.refs[branch] = sha
    return sha

  def resolve(self, revision: str) -> str | None:
    revision = urllib.parse.unquote(revision)
    if revision in self.refs:
      return self.refs[revision]
    return revision if revision in self.commits else None


class FakeHub:
  """Start with `with FakeHub() as hub:`; `hub.endpoint` is the HF_ENDPOINT to use."""

  def __init__(self):
    self.repos: dict[tuple[str, str], Repo] = {}
    self.requests: list[tuple[str, str, dict]] = []  # (method, path, selected headers)
    self.commits: list[dict] = []  # every commit received: repo, type, summary, files {path: bytes}, deleted
    self.lock = threading.Lock()
    hub = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *args):
        del args

      def do_HEAD(self):
        hub.handle(self, "HEAD")

      def do_GET(self):
        hub.handle(self, "GET")

      def do_POST(self):
        hub.handle(self, "POST")

    self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
    self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

  def __enter__(self):
    self.thread.start()
    return self

  def __exit__(self, *exc):
    self.server.shutdown()
    self.server.server_close()

  def add_repo(self, repo_id: str, files: dict, repo_type: str = "model", private_token: str | None = None) -> Repo:
    self.repos[(repo_type, repo_id)] = Repo(files, private_token)
    return self.repos[(repo_type, repo_id)]

  # ----------------------------------------------------------------------------------------------------------------

  def handle(self, h, method: str) -> None:
    url = urllib.parse.urlsplit(h.path)
    path, query = url.path, urllib.parse.parse_qs(url.query)
    body = b""
    if method == "POST":
      body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
    with self.lock:
      self.requests.append((method, path, {k: h.headers[k] for k in ("Range", "Authorization") if k in h.headers}))
    try:
      self.route(h, method, path, query, body)
    except Exception as e:  # pylint: disable=broad-except  # a bug in the fake: say so in the response
      self.reply(h, 500, {"error": f"fake hub: {type(e).__name__}: {e}"})

  def reply(self, h, status: int, payload=None, headers=None, raw: bytes | None = None, method: str = "GET"):
    data = raw if raw is not None else json.dumps(payload).encode()
    h.send_response(status)
    for key, value in (headers or {}).items():
      h.send_header(key, value)
    if raw is None:
      h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    if method != "HEAD":
      h.wfile.write(data)

  def error(self, h, status: int, code: str, message: str, method: str = "GET", commit: str | None = None):
    headers = {"X-Error-Code": code, "X-Error-Message": message}
    if commit:
      headers["X-Repo-Commit"] = commit
    self.reply(h, status, {"error": message}, headers, method=method)

  def repo(self, h, repo_type: str, repo_id: str, method: str):
    repo = self.repos.get((repo_type, repo_id))
    if repo is None:
      self.error(h, 404, "RepoNotFound", f"Repository not found: {repo_id}", method)
      return None
    if repo.private_token and h.headers.get("Authorization") != f"Bearer {repo.private_token}":
      self.error(h, 401, "RepoNotFound", "Invalid credentials in Authorization header", method)
      return None
    return repo

  def route(self, h, method, path, query, body):
    api = re.match(r"^/api/(models|datasets)/([^/]+/[^/]+)(?:/(revision|tree|preupload|commit)/([^/]+)(/.*)?)?$",
                   path)
    resolve = re.match(r"^(/datasets)?/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
    if method == "POST" and path == "/api/repos/create":
      return self.create(h, json.loads(body))
    if method == "POST" and path == "/api/validate-yaml":  # a README.md's metadata, checked before a commit
      return self.reply(h, 200, {"errors": [], "warnings": []})
    if api:
      repo_type, repo_id, verb, revision, rest = api.groups()
      repo_type = repo_type[:-1]
      repo = self.repo(h, repo_type, repo_id, method)
      if repo is None:
        return None
      sha = repo.resolve(revision or "main")
      if sha is None:
        return self.error(h, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
      if verb in (None, "revision"):
        return self.reply(h, 200, {"id": repo_id, "sha": sha, "private": bool(repo.private_token),
                                   "siblings": [{"rfilename": p} for p in sorted(repo.commits[sha])]})
      if verb == "tree":
        return self.tree(h, repo, sha, urllib.parse.unquote((rest or "").lstrip("/")),
                         query.get("recursive", ["false"])[0].lower() == "true")
      if verb == "preupload":
        files = json.loads(body)["files"]
        return self.reply(h, 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                              "oid": None} for f in files]})
      if verb == "commit":
        return self.commit(h, repo_type, repo_id, repo, urllib.parse.unquote(revision), body)
    if resolve and method in ("GET", "HEAD"):
      prefix, repo_id, revision, file_path = resolve.groups()
      repo = self.repo(h, "dataset" if prefix else "model", repo_id, method)
      if repo is None:
        return None
      return self.serve_file(h, method, repo, revision, urllib.parse.unquote(file_path))
    return self.error(h, 404, "NotFound", f"fake hub has no route for {method} {path}", method)

  def tree(self, h, repo: Repo, sha: str, folder: str, recursive: bool):
    files = repo.commits[sha]
    prefix = folder + "/" if folder else ""
    below = [p for p in files if p.startswith(prefix)]
    if folder and not below:
      return self.error(h, 404, "EntryNotFound", f"{folder} does not exist at {sha}")
    entries, folders = [], set()
    for p in sorted(below):
      rest = p[len(prefix):]
      parts = rest.split("/")
      for depth in range(1, len(parts)):
        if recursive or depth == 1:
          folders.add(prefix + "/".join(parts[:depth]))
      if recursive or len(parts) == 1:
        data = files[p]
        entries.append({"type": "file", "path": p, "size": len(data), "oid": hashlib.sha1(data).hexdigest()})
    entries += [{"type": "directory", "path": f, "size": 0, "oid": hashlib.sha1(f.encode()).hexdigest()}
                for f in sorted(folders)]
    return self.reply(h, 200, entries)

  def serve_file(self, h, method, repo: Repo, revision: str, file_path: str):
    sha = repo.resolve(revision)
    if sha is None:
      return self.error(h, 404, "RevisionNotFound", f"Invalid rev id: {revision}", method)
    data = repo.commits[sha].get(file_path)
    if data is None:
      return self.error(h, 404, "EntryNotFound", f"{file_path} does not exist at {sha}", method, commit=sha)
    etag = hashlib.sha256(data).hexdigest()
    headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "X-Linked-Etag": f'"{etag}"',
               "X-Linked-Size": str(len(data)), "Accept-Ranges": "bytes"}
    status, part = 200, data
    ranged = re.match(r"^bytes=(\d+)-(\d*)$", h.headers.get("Range") or "")
    if ranged and method == "GET":
      start = int(ranged.group(1))
      stop = int(ranged.group(2)) + 1 if ranged.group(2) else len(data)
      status, part = 206, data[start:stop]
      headers["Content-Range"] = f"bytes {start}-{start + len(part) - 1}/{len(data)}"
    headers["Content-Type"] = "application/octet-stream"
    return self.reply(h, status, headers=headers, raw=part, method=method)

  def create(self, h, payload: dict):
    repo_type = payload.get("type") or "model"
    repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
    url = f"{self.endpoint}/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
    if (repo_type, repo_id) in self.repos:
      return self.reply(h, 409, {"error": "You already created this repo", "url": url})
    self.add_repo(repo_id, {".gitattributes": b"*.parquet filter=lfs\n"}, repo_type)
    self.repos[(repo_type, repo_id)].visibility = payload.get("visibility")
    return self.reply(h, 200, {"url": url})

  def commit(self, h, repo_type: str, repo_id: str, repo: Repo, branch: str, body: bytes):
    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
    header = next(line["value"] for line in lines if line["key"] == "header")
    files = dict(repo.commits[repo.refs[branch]])
    added, deleted = {}, []
    for line in lines:
      if line["key"] == "file":
        added[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
      elif line["key"] == "deletedFile":
        deleted.append(line["value"]["path"])
      elif line["key"] != "header":
        return self.error(h, 400, "BadRequest", f"fake hub: unsupported commit line {line['key']}")
    files.update(added)
    for path in deleted:
      files.pop(path, None)
    sha = repo.add_commit(files, branch)
    with self.lock:
      self.commits.append({"repo": repo_id, "type": repo_type, "summary": header["summary"], "files": added,
                           "deleted": deleted, "sha": sha})
    prefix = "datasets/" if repo_type == "dataset" else ""
    return self.reply(h, 200, {"commitUrl": f"{self.endpoint}/{prefix}{repo_id}/commit/{sha}", "commitOid": sha,
                               "pullRequestUrl": None})
