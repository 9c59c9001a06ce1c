"""hf:// paths: files of Hugging Face hub repos, downloaded whole into the hub's cache before a stage reads them;
and folders pushed to the hub as one commit.

    hf://[datasets/]<org>/<repo>[@<revision>]/<path>      (fsspec HfFileSystem's form; quote a revision holding "/")

A path names a file or a folder (or a glob of them) of the repo at a branch, tag or commit ("main" when none). It is
downloaded with `snapshot_download` and patterns (whole files, each once: one listing, then a HEAD and a GET per
file, never ranged reads, which the hub's request limits would throttle) into the hub cache (HF_HUB_CACHE, default
~/.cache/huggingface/hub), and the stage reads the cached files in place: `<cache>/<type>s--<org>--<repo>/snapshots/
<commit>/<path>`. That location names the commit, so `origin` recovers it from any path a stage reads, and every
artifact imported from the hub records it in its request (a new revision is a new artifact). `optim.pt` (optimizer
state, twice the model) is never downloaded unless the path names it. On the original's release (RELEASE) the
names of its registry are mapped to the release's: `down` (the 8 downstream tasks) is called `all` there.

The environment: HF_TOKEN (private repos), HF_ENDPOINT (another hub), HF_HUB_CACHE / HF_HOME, HF_HUB_OFFLINE=1
(the cache only: a path already downloaded at that revision needs no network).
"""
import dataclasses
import os
import pathlib
import re
import urllib.parse

from colorjax import errors

SCHEME = "hf://"
RELEASE = "hlzhang109/CoLoR-filter"  # the original's release: models/, scores/, indices/, full_data/, downstream_data/
SKIPPED = ("optim.pt",)  # downloaded only when a path names the file itself
# The original's registry names its 8-task target "down" (c4-down-tau=N, conditional_down); the release, "all".
_RELEASE_NAME = re.compile(r"(?:(?<=[/_-])|^)down(?=[-_=/]|$)")
_CACHED = re.compile(r"(?:^|/)(model|dataset|space)s--([^/]+?)--([^/]+)/snapshots/([0-9a-f]{40})(?:/(.*))?$")
_TYPES = {"datasets": "dataset", "spaces": "space"}


def is_hub(value) -> bool:
  return isinstance(value, str) and value.startswith(SCHEME)


@dataclasses.dataclass(frozen=True)
class HubPath:
  """A parsed hf:// URL."""
  repo_type: str  # model | dataset | space
  repo_id: str
  revision: str
  path: str

  def url(self, revision: str | None = None) -> str:
    prefix = "" if self.repo_type == "model" else f"{self.repo_type}s/"
    rev = revision or self.revision
    return f"{SCHEME}{prefix}{self.repo_id}@{urllib.parse.quote(rev, safe='')}/{self.path}".rstrip("/")


def parse(url: str) -> HubPath:
  """hf://[datasets/|spaces/]<org>/<repo>[@<revision>][/<path>] -> HubPath; a malformed URL is a ConfigError."""
  if not is_hub(url):
    raise errors.ConfigError(f"{url!r} is not an hf:// path (hf://<org>/<repo>[@<revision>]/<path>)")
  parts = url[len(SCHEME):].split("/")
  repo_type = _TYPES.get(parts[0], "model")
  parts = parts[1:] if parts[0] in _TYPES else parts
  if len(parts) < 2 or not parts[0] or not parts[1]:
    raise errors.ConfigError(f"{url}: name a repo and a path in it, hf://[datasets/]<org>/<repo>[@<revision>]/<path>")
  name, _, revision = parts[1].partition("@")
  path = "/".join(p for p in parts[2:] if p)
  if ".." in path.split("/"):
    raise errors.ConfigError(f"{url}: a path in a repo cannot go up with '..'")
  return HubPath(repo_type, f"{parts[0]}/{name}", urllib.parse.unquote(revision) or "main", path)


def release_names(hub_path: HubPath) -> tuple[HubPath, str | None]:
  """The path with the original registry's names mapped to the release's (only on RELEASE), and a note when one
  was: c4-down-tau=N -> c4-all-tau=N, conditional_down -> conditional_all, down-N-seq -> all-N-seq."""
  if hub_path.repo_id.lower() != RELEASE.lower():
    return hub_path, None
  mapped = _RELEASE_NAME.sub("all", hub_path.path)
  if mapped == hub_path.path:
    return hub_path, None
  return (dataclasses.replace(hub_path, path=mapped),
          f"{hub_path.path} -> {mapped} (the release calls the registry's 'down' target 'all')")


def cache_dir() -> pathlib.Path:
  """The hub cache, read from the environment now (huggingface_hub reads it once, at import)."""
  if os.environ.get("HF_HUB_CACHE"):
    return pathlib.Path(os.environ["HF_HUB_CACHE"]).expanduser()
  home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
  return pathlib.Path(home).expanduser() / "hub"


def offline() -> bool:
  return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _client_kwargs() -> dict:
  return {"endpoint": os.environ.get("HF_ENDPOINT") or None, "token": os.environ.get("HF_TOKEN") or None}


def _patterns(path: str) -> tuple[list[str] | None, list[str] | None]:
  """allow / ignore patterns of a path (a file, a folder, or a glob of them): what is under it, without optim.pt
  unless the path names that file."""
  allow = [path, f"{path}/*"] if path else None
  named = pathlib.PurePosixPath(path).name
  ignore = [p for s in SKIPPED if s != named for p in (s, f"*/{s}")]
  return allow, ignore or None


def _hub_error(url: str, e: Exception) -> errors.DataError:
  name = type(e).__name__
  if name in ("LocalEntryNotFoundError", "IncompleteSnapshotError", "OfflineModeIsEnabled"):
    return errors.DataError(f"{url} is not in the hub cache ({cache_dir()}) and the hub cannot be reached "
                            f"({'HF_HUB_OFFLINE=1' if offline() else name}): run it once online to download it")
  return errors.DataError(f"cannot download {url}: {name}: {str(e).splitlines()[0] if str(e) else ''}; check the repo "
                          "and revision, HF_TOKEN for a private or gated repo, and HF_ENDPOINT")


def download(url: str) -> pathlib.Path:
  """The local path of an hf:// URL, after downloading what it names (whole files) into the hub cache; a revision
  is resolved to its commit once, and the returned path names it (`origin`). A glob stays a glob."""
  from huggingface_hub import snapshot_download  # pylint: disable=import-outside-toplevel
  hub_path, note = release_names(parse(url))
  if note:
    print(f"hub: {note}", flush=True)
  allow, ignore = _patterns(hub_path.path)
  try:
    snapshot = snapshot_download(hub_path.repo_id, repo_type=hub_path.repo_type, revision=hub_path.revision,
                                 cache_dir=str(cache_dir()), allow_patterns=allow, ignore_patterns=ignore,
                                 local_files_only=offline(), **_client_kwargs())
  except Exception as e:  # pylint: disable=broad-except  # httpx / huggingface_hub errors: one line for the user
    raise _hub_error(url, e) from e
  local = pathlib.Path(snapshot) / hub_path.path
  if not any(c in hub_path.path for c in "*?[") and not local.exists():
    raise errors.DataError(f"{url}: {hub_path.repo_id} has no {hub_path.path or 'files'} at revision "
                           f"{hub_path.revision} (commit {pathlib.Path(snapshot).name}); check the path")
  return local


def plan(url: str) -> list[dict]:
  """What `download(url)` would fetch, without fetching it: [{path, bytes, cached}], from one listing of the repo at
  its resolved commit (the dry runs)."""
  from huggingface_hub import HfApi  # pylint: disable=import-outside-toplevel
  from huggingface_hub.utils import filter_repo_objects  # pylint: disable=import-outside-toplevel
  hub_path, _ = release_names(parse(url))
  allow, ignore = _patterns(hub_path.path)
  api = HfApi(**_client_kwargs())
  try:
    commit = api.repo_info(hub_path.repo_id, repo_type=hub_path.repo_type, revision=hub_path.revision).sha
    listing = {f.path: f.size for f in api.list_repo_tree(hub_path.repo_id, repo_type=hub_path.repo_type,
                                                          revision=commit, recursive=True) if hasattr(f, "size")}
  except Exception as e:  # pylint: disable=broad-except
    raise _hub_error(url, e) from e
  snapshot = cache_dir() / f"{hub_path.repo_type}s--{hub_path.repo_id.replace('/', '--')}" / "snapshots" / commit
  return [{"path": p, "bytes": listing[p], "cached": (snapshot / p).is_file()}
          for p in filter_repo_objects(sorted(listing), allow_patterns=allow, ignore_patterns=ignore)]


def localize(value):
  """A config value with every hf:// path downloaded and replaced by its local path: a string (several joined by
  "+", as score folders are), or a tuple of them; anything else unchanged."""
  if isinstance(value, (tuple, list)):
    return type(value)(localize(v) for v in value)
  if not is_hub(value):
    return value
  parts = value.split("+")
  if len(parts) > 1 and all(is_hub(p.strip()) for p in parts):
    return "+".join(str(download(p.strip())) for p in parts)
  return str(download(value))


def localize_config(cfg) -> list[str]:
  """Replace every hf:// path in the config by its downloaded local path; returns the values replaced."""
  found = []

  def visit(node):
    for key in list(node.keys()):
      value = node[key]
      if hasattr(value, "keys"):
        visit(value)
      elif is_hub(value) or (isinstance(value, (tuple, list)) and any(is_hub(v) for v in value)):
        found.append(value)
        node[key] = localize(value)

  visit(cfg)
  return found


def origin(path) -> dict | None:
  """{repo, type, commit, path} of a file or folder in the hub cache (or a glob there), None for any other path."""
  match = _CACHED.search(os.path.abspath(str(path)).replace(os.sep, "/"))
  if not match:
    return None
  kind, org, name, commit, rest = match.groups()
  return {"repo": f"{org}/{name}", "type": kind, "commit": commit, "path": rest or ""}


def origins(paths) -> list[dict]:
  """The distinct {repo, type, commit} the given paths were downloaded from (empty when none came from the hub):
  what an artifact's request records, so that another revision of its inputs is another artifact."""
  seen = {}
  for path in paths:
    found = origin(path)
    if found:
      key = (found["repo"], found["type"], found["commit"])
      seen[key] = {"repo": key[0], "type": key[1], "commit": key[2]}
  return [seen[k] for k in sorted(seen)]


def with_origins(request: dict, paths) -> dict:
  """An artifact's request plus `hub`: the commits its inputs were downloaded at, when any came from the hub (another
  revision of them is another artifact). Unchanged for local inputs, so their ids stay what they were."""
  hub = origins(paths)
  return {**request, "hub": hub} if hub else request


def push_folder(folder, repo_id: str, repo_type: str, message: str, private: bool) -> dict:
  """Every file under `folder` committed to `repo_id` as ONE commit (created first if missing, private as asked);
  returns {repo, type, commit, url, files}. The hub's upload limits count commits, not files."""
  from huggingface_hub import CommitOperationAdd, HfApi  # pylint: disable=import-outside-toplevel
  folder = pathlib.Path(folder)
  files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
  names = [p.relative_to(folder).as_posix() for p in files]
  api = HfApi(**_client_kwargs())
  url = f"{SCHEME}{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}"
  try:
    api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    info = api.create_commit(repo_id, [CommitOperationAdd(n, str(p)) for n, p in zip(names, files)],
                             commit_message=message, repo_type=repo_type)
  except Exception as e:  # pylint: disable=broad-except
    raise errors.DataError(f"cannot push {folder} to {url}: {type(e).__name__}: {str(e).splitlines()[0]}; check "
                           "HF_TOKEN (a token with write access) and the repo id") from e
  return {"repo": repo_id, "type": repo_type, "commit": info.oid, "url": info.commit_url, "files": names}
