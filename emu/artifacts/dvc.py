"""The DVC adapter: content-addressed artifacts in a DVC remote (DESIGN.md, "DVC versions the data
and the artifacts"). The platform's only `dvc` import lives here.

    store = ArtifactStore()                       # $EMU_HOME/dvc-remote, or $EMU_DVC_REMOTE
    ref = store.push("outputs/stage1/model")      # ArtifactRef(md5='3f…e1.dir', size, uri, nfiles)
    store.pull(ref.md5, "restored/model")         # the same bytes, on any machine

What an md5 is
    Exactly what `dvc add` records in a `.dvc` file / `dvc.lock` for the same bytes: the MD5 of
    a file's bytes, or for a folder the MD5 of DVC's `.dir` listing (sorted relative paths and
    file MD5s) with a `.dir` suffix. Names of the folder itself and of its parents do not enter
    it, so the same bytes give the same md5 under any path and on any machine; timestamps,
    permissions and empty subfolders do not enter it either (DVC tracks files only). DVC's own
    ignore rules apply as in `dvc add`: `.git`, `.hg` and `.dvc` folders inside an artifact are not
    part of it, and a `.dvcignore` file inside one is refused. Hashing is DVC's own
    (`dvc_data.hashfile.build`), not a re-implementation, so the value always agrees with `dvc`.

How it is stored
    The remote has DVC's own layout (`<remote>/files/md5/<2>/<30>[.dir]`), so it is an ordinary
    DVC remote: datasets that `dvc push` sends from the repository's `dvc.yaml` and artifacts that
    stages push here share one content-addressed store, and `dvc pull` or `ArtifactStore.pull`
    read either. A push uploads only the objects the remote lacks (a folder's `.dir` listing last,
    so an interrupted push never looks complete); pushing unchanged bytes uploads nothing. Files go
    straight from the source folder to the remote, without a local copy.

Where DVC's state lives
    In a private workdir (`$EMU_HOME/dvc-state` unless given): a DVC repository without
    SCM holding the fetch cache (`.dvc/cache`, filled by pulls only: pushes go straight from the
    source to the remote) and DVC's hash/state database (`site/`, unless $DVC_SITE_CACHE_DIR
    says otherwise; DVC gives that variable precedence). Nothing is written into the folders being
    pushed or restored, nor into the project repository, and a user's global DVC config cannot
    redirect the cache or the remote (the store's settings are merged over it). The remote settings,
    S3 credentials included, are handed to DVC in memory for each operation, never written to disk.

Concurrency
    KFP local runs tasks as separate processes, so one workdir may be used by several processes:
    every operation holds an exclusive `flock` on `<workdir>/lock` (released by the kernel when a
    process dies). Processes on other machines (other workdirs) share only the remote, where DVC
    writes every object atomically (temporary name, then rename; S3 puts are atomic), and objects
    are content-addressed, so concurrent pushes of the same bytes write identical objects.

How pipeline outputs appear to DVC users
    Decision: pipeline outputs are not `dvc.yaml` outs. KFP runs the pipeline (its cache, its
    pipeline root), and a `dvc.yaml` copy of the DAG would be a second definition of every stage
    that drifts from the first. Instead every artifact a task writes is pushed here and its md5
    and size are recorded in the lineage store (emu.pipeline.tasks), so:
      * `emu artifacts pull RUN_ID --out DIR` (`pull_run`) restores a whole run on a fresh machine
        from the run id alone, as DIR/<stage>/<role>/ plus DIR/manifest.json;
      * `emu artifacts get MD5 --out DIR` restores one artifact (what `emu lineage` shows);
      * a DVC user tracks any artifact in their own DVC project by md5: a `.dvc` file whose out
        names that md5 (`outs: [{md5: <md5>, path: model, hash: md5}]`) and `dvc pull` against
        this remote restore it, with no emu code involved.
    Datasets are prepared outside KFP as well as inside it, so they are `dvc.yaml` stages
    (`dvc repro`, `dvc push`); their md5s in `dvc.lock` are the values `ArtifactStore.md5` gives,
    which the KFP pipeline takes as `source_md5` (its cache keys on names, not contents).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emu.errors import ConfigError, EmuError, SourceError

__all__ = [
    "ArtifactNotFoundError", "ArtifactRef", "ArtifactStore", "MANIFEST_FILE", "PulledArtifact", "RemoteFile",
    "check_md5", "default_remote", "default_workdir", "emu_home", "pull_run",
]

log = logging.getLogger(__name__)

#: Name of the remote inside the private DVC repository (it never appears anywhere else).
_REMOTE_NAME = "emu"
_MD5_RE = re.compile(r"^[0-9a-f]{32}(\.dir)?$")
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_TMP_PREFIX = ".emu-dvc-tmp-"
#: What `pull_run` writes next to the restored artifacts.
MANIFEST_FILE = "manifest.json"


class ArtifactNotFoundError(SourceError):
    """An md5 that the remote does not hold (never pushed, or only partly)."""


# ---------------------------------------------------------------------------------------------
# Defaults


def emu_home() -> Path:
    """`$EMU_HOME`, else the platform's one default (emu.home; read at call time)."""
    from emu.home import emu_home as home

    return home()


def default_remote() -> str:
    """`$EMU_DVC_REMOTE` (a folder or s3://bucket/prefix), else `$EMU_HOME/dvc-remote`."""
    return os.environ.get("EMU_DVC_REMOTE") or str(emu_home() / "dvc-remote")


def default_workdir() -> Path:
    """`$EMU_HOME/dvc-state`: the private DVC repository and cache."""
    return emu_home() / "dvc-state"


# ---------------------------------------------------------------------------------------------
# References


@dataclass(frozen=True)
class ArtifactRef:
    """The content address of a file or folder in the remote, as the lineage store records it."""

    #: DVC md5: `<32 hex>` for a file, `<32 hex>.dir` for a folder (see the module docstring).
    md5: str
    #: Total bytes of the file, or of all files of the folder.
    size: int
    #: Where the object lives in the remote: the `.dir` listing for a folder, the file object else.
    uri: str
    #: 1 for a file, the number of files for a folder.
    nfiles: int

    @property
    def is_dir(self) -> bool:
        return self.md5.endswith(".dir")

    def to_json(self) -> dict[str, Any]:
        return {"md5": self.md5, "size": self.size, "uri": self.uri, "nfiles": self.nfiles}


def check_md5(md5: str) -> str:
    """`md5` if it is a DVC md5 (`<32 lowercase hex>` or `<32 hex>.dir`), else ConfigError."""
    if not isinstance(md5, str) or not _MD5_RE.match(md5):
        raise ConfigError(f"{md5!r} is not a DVC md5: expected 32 lowercase hex digits, with "
                          f"'.dir' appended for a folder")
    return md5


# ---------------------------------------------------------------------------------------------
# The store


class ArtifactStore:
    """Push, pull and hash artifacts by DVC md5 in one DVC remote.

    `remote`: a local folder, or `s3://bucket/prefix` (endpoint and credentials from `settings`,
    an `emu.artifacts.s3.S3Settings`, else the AWS_* variables); None = `default_remote()`.
    `workdir`: the private folder for DVC's repository, cache and state; None = `default_workdir()`.
    Nothing touches the disk or the network until an operation runs.
    """

    def __init__(self, remote: str | os.PathLike[str] | None = None,
                 workdir: str | os.PathLike[str] | None = None, settings: Any = None) -> None:
        remote = default_remote() if remote is None else os.fspath(remote)
        if not remote:
            raise ConfigError("artifact remote is empty: give a folder or an s3://bucket/prefix URI")
        self._settings = settings
        if _SCHEME_RE.match(remote) or remote.lower().startswith("s3:"):
            from emu.artifacts.s3 import S3Location

            if not remote.lower().startswith("s3:"):
                raise ConfigError(f"unsupported artifact remote {remote!r}: expected a local folder "
                                  f"or s3://bucket/prefix")
            self._s3 = S3Location.parse(remote)  # ConfigError naming the URI when malformed
            self.remote = self._s3.uri
        else:
            self._s3 = None
            self.remote = str(Path(remote).expanduser().absolute())
        self.workdir = Path(workdir).expanduser().absolute() if workdir is not None else default_workdir()
        if self._s3 is None and _inside(Path(self.remote), self.workdir):
            raise ConfigError(f"artifact remote {self.remote} must not be inside the store's "
                              f"workdir {self.workdir}")

    def __repr__(self) -> str:
        return f"ArtifactStore(remote={self.remote!r}, workdir={str(self.workdir)!r})"

    # -- operations ---------------------------------------------------------------------------

    def md5(self, path: str | os.PathLike[str]) -> str:
        """DVC's md5 of a file or folder, as `dvc add` would record it (nothing is uploaded)."""
        source = _existing(path)
        with self._repo(remote=False) as repo:  # no remote settings needed (nor S3 credentials)
            _, _, obj = self._build(repo, source, dry_run=True)
            return obj.hash_info.value

    def push(self, path: str | os.PathLike[str]) -> ArtifactRef:
        """Content-address a file or folder into the remote; upload only what the remote lacks."""
        from dvc_data.hashfile.transfer import transfer

        source = _existing(path)
        with self._repo() as repo:
            staging, meta, obj = self._build(repo, source, dry_run=False)
            odb = self._remote_odb(repo)
            md5 = obj.hash_info.value
            with self._remote_errors(f"cannot push {source}"):
                result = transfer(staging, odb, {obj.hash_info}, hardlink=False, shallow=False)
            if result.failed:
                raise SourceError(f"cannot push {source} to {self.remote}: {len(result.failed)} "
                                  f"object(s) failed to upload (see the log above); run again")
            ref = ArtifactRef(md5=md5, size=int(meta.size or 0), uri=self._uri(odb, md5),
                              nfiles=int(meta.nfiles or 0) if obj.hash_info.isdir else 1)
            log.info("pushed %s as %s: %d object(s) uploaded, the rest already in %s", source, md5,
                     len(result.transferred), self.remote)
            return ref

    def exists(self, md5: str) -> bool:
        """Whether the remote holds every object of `md5` (for a folder: its listing and all files)."""
        from dvc_data.hashfile.tree import Tree

        check_md5(md5)
        with self._repo() as repo:
            odb = self._remote_odb(repo)
            with self._remote_errors(f"cannot look up {md5}"):
                if not _remote_has(odb, md5):
                    return False
                if not md5.endswith(".dir"):
                    return True
                tree = Tree.load(odb, _hash_info(md5))
                oids = {oid.value for _, _, oid in tree}
                return set(odb.oids_exist(oids)) == oids

    def pull(self, md5: str, dest: str | os.PathLike[str], filename: str | None = None) -> Path:
        """Restore the bytes of `md5` into the folder `dest` (absent or empty); return the restored path.

        A folder artifact fills `dest` itself (returned); a file artifact is written to
        `dest/<filename>` (default: the md5), and that file's path is returned. Objects come from
        the remote into the workdir's cache (each one checked against its md5), then are copied to a
        temporary folder beside `dest` that is renamed into place: `dest` is never left half-written.
        An md5 the remote lacks raises ArtifactNotFoundError naming it.
        """
        check_md5(md5)
        dest = Path(dest).expanduser().absolute()
        if md5.endswith(".dir"):
            if filename is not None:
                raise ConfigError(f"{md5} is a folder artifact; pull it without a file name")
        else:
            filename = filename or md5
            if Path(filename).name != filename or filename in (".", ".."):
                raise ConfigError(f"file name {filename!r} for {md5} must be a plain name, not a path")
        _require_empty(dest)
        with self._repo() as repo:
            obj = self._fetch(repo, md5)
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.parent / f"{_TMP_PREFIX}{secrets.token_hex(8)}"
            try:
                self._checkout(repo, obj, tmp if md5.endswith(".dir") else tmp / filename)
                if md5.endswith(".dir"):
                    tmp.mkdir(exist_ok=True)  # an empty folder artifact has nothing to check out
                _require_empty(dest)  # again: someone may have written there meanwhile
                if dest.exists():
                    dest.rmdir()
                os.replace(tmp, dest)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return dest if md5.endswith(".dir") else dest / filename

    def pull_files(self, md5: str, dest: str | os.PathLike[str], wanted: Callable[[str], bool]) -> list[RemoteFile]:
        """Restore into `dest` only the files of folder artifact `md5` whose relative path
        `wanted` accepts, and return the listing of all its files with their objects' locations
        in the remote (`s3://bucket/.../files/md5/..` or a local path), so that a reader (a Ray
        worker) can read each of the others straight from the remote, one at a time, without
        pulling the folder. Files already in `dest` with their md5's size are kept."""
        from dvc_data.hashfile.transfer import transfer
        from dvc_data.hashfile.tree import Tree

        check_md5(md5)
        if not md5.endswith(".dir"):
            raise ConfigError(f"{md5} is a file artifact; only a folder artifact has files to choose from")
        dest = Path(dest).expanduser().absolute()
        with self._repo() as repo:
            odb = self._remote_odb(repo)
            where = f"cannot pull files of {md5}"
            with self._remote_errors(where):
                if not _remote_has(odb, md5):
                    raise ArtifactNotFoundError(f"artifact {md5} is not in the remote {self.remote} (never "
                                                f"pushed there, or pushed to another remote)")
                tree = Tree.load(odb, _hash_info(md5))
                files = [RemoteFile(relpath="/".join(key), md5=oid.value, uri=self._uri(odb, oid.value))
                         for key, _, oid in sorted(tree, key=lambda entry: entry[0])]
                chosen = [f for f in files if wanted(f.relpath)]
                result = transfer(odb, repo.cache.local, {_hash_info(f.md5) for f in chosen}, verify=True,
                                  hardlink=False, shallow=False)
            if result.failed:
                raise SourceError(f"{where} from {self.remote}: {len(result.failed)} object(s) failed to "
                                  f"download (see the log above); run again")
            for f in chosen:
                cached, target = Path(repo.cache.local.oid_to_path(f.md5)), dest / f.relpath
                if target.is_file() and target.stat().st_size == cached.stat().st_size:
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f"{_TMP_PREFIX}{secrets.token_hex(8)}")
                shutil.copyfile(cached, tmp)
                os.replace(tmp, target)
        return files

    def uri_of(self, md5: str) -> str:
        """Where the object of `md5` is (or would be) in the remote: its `.dir` listing for a folder."""
        check_md5(md5)
        with self._repo() as repo:
            return self._uri(self._remote_odb(repo), md5)

    def pull_cached(self, md5: str, cache: str | os.PathLike[str], skip: tuple[str, ...] = ()) -> Path:
        """`cache/<md5>`, pulled once per machine: concurrent callers (a node's ranks, a Ray
        node's actors) wait on one lock, and a copy that is complete is used as it is. `skip`:
        folders of the artifact not to pull (`lm/`: an encoder never reads the 33B LM)."""
        check_md5(md5)
        cache = Path(cache).expanduser().absolute()
        cache.mkdir(parents=True, exist_ok=True)
        name = md5 + "".join(f"-without-{folder.strip('/')}" for folder in skip)
        dest, done = cache / name, cache / f"{name}.complete"
        with _locked(cache / f"{name}.lock"):
            if not done.exists():
                shutil.rmtree(dest, ignore_errors=True)
                if skip:
                    self.pull_files(md5, dest, wanted=lambda relpath: not relpath.startswith(skip))
                else:
                    self.pull(md5, dest, None if md5.endswith(".dir") else "file")
                done.touch()
        return dest

    # -- DVC plumbing --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _repo(self, remote: bool = True) -> Iterator[Any]:
        """The private DVC repository, opened under the workdir's lock."""
        from dvc.repo import Repo

        self.workdir.mkdir(parents=True, exist_ok=True)
        with _locked(self.workdir / "lock"):
            dvc_dir = self.workdir / Repo.DVC_DIR
            if not (dvc_dir / "config").is_file():
                # What `dvc init --no-scm` writes, without its console output (Repo.init prints).
                dvc_dir.mkdir(exist_ok=True)
                (dvc_dir / "config").write_text("[core]\n    no_scm = True\n")
            repo = Repo(str(self.workdir), config=self._dvc_config(remote))
            try:
                yield repo
            finally:
                repo.close()

    def _dvc_config(self, remote: bool) -> dict[str, Any]:
        """DVC settings for the private repository, merged over any user/system DVC config, so
        a user's global `cache.dir` or default remote can never redirect this store."""
        config: dict[str, Any] = {
            "core": {"no_scm": True, "check_update": False, "analytics": False,
                     "site_cache_dir": str(self.workdir / "site")},
            # Never hard- or symlink restored files to the cache: editing one would corrupt it.
            "cache": {"dir": str(self.workdir / ".dvc" / "cache"), "type": "reflink,copy"},
        }
        if remote:
            config["core"]["remote"] = _REMOTE_NAME
            config["remote"] = {_REMOTE_NAME: self._remote_config()}
        return config

    def _remote_config(self) -> dict[str, Any]:
        if self._s3 is None:
            return {"url": self.remote}
        from emu.artifacts.s3 import S3Settings

        settings = (self._settings or S3Settings()).resolved()
        config: dict[str, Any] = {"url": self._s3.uri}
        for key, value in (("endpointurl", settings.endpoint_url), ("region", settings.region),
                           ("access_key_id", settings.access_key_id),
                           ("secret_access_key", settings.secret_access_key),
                           ("session_token", settings.session_token)):
            if value:
                config[key] = value
        return config

    def _remote_odb(self, repo: Any) -> Any:
        with self._remote_errors("cannot open the remote"):
            return repo.cloud.get_remote_odb(_REMOTE_NAME, "push")

    def _build(self, repo: Any, source: Path, dry_run: bool) -> tuple[Any, Any, Any]:
        """DVC's own hashing (as in `dvc add`); the workdir's state database caches file hashes."""
        from dvc.fs import LocalFileSystem
        from dvc.ignore import DvcIgnoreFilter
        from dvc_data.hashfile.build import IgnoreInCollectedDirError, build

        fs = LocalFileSystem()
        path = os.fspath(source)
        ignore = DvcIgnoreFilter(fs, path) if source.is_dir() else None
        try:
            return build(repo.cache.local, path, fs, "md5", dry_run=dry_run, ignore=ignore)
        except IgnoreInCollectedDirError as exc:
            raise ConfigError(f"cannot version {source}: {exc} (DVC refuses ignore files inside an "
                              f"artifact; remove it)") from None

    def _fetch(self, repo: Any, md5: str) -> Any:
        """The object of `md5` in the local cache, fetched from the remote when missing."""
        from dvc_data.hashfile.transfer import transfer

        cache = repo.cache.local
        info = _hash_info(md5)
        obj = _cached(cache, md5)
        if obj is not None:
            return obj
        odb = self._remote_odb(repo)
        where = f"cannot pull {md5}"
        with self._remote_errors(where):
            if not _remote_has(odb, md5):
                raise ArtifactNotFoundError(
                    f"artifact {md5} is not in the remote {self.remote} (never pushed there, or "
                    f"pushed to another remote)")

            def refuse_missing(status: Any) -> None:
                if status.missing:
                    raise ArtifactNotFoundError(
                        f"artifact {md5} is incomplete in the remote {self.remote}: "
                        f"{len(status.missing)} of its file objects are missing (e.g. "
                        f"{sorted(h.value for h in status.missing)[0]}); push it again")

            # The listing of a folder is read from the remote (it is not in the cache yet).
            result = transfer(odb, cache, {info}, verify=True, hardlink=False, shallow=False,
                              validate_status=refuse_missing)
        if result.failed:
            raise SourceError(f"{where} from {self.remote}: {len(result.failed)} object(s) failed "
                              f"to download (see the log above); run again")
        obj = _cached(cache, md5)
        if obj is None:
            raise SourceError(f"{where} from {self.remote}: objects are still missing from the "
                              f"cache after fetching; run again")
        return obj

    def _checkout(self, repo: Any, obj: Any, target: Path) -> None:
        from dvc.fs import LocalFileSystem
        from dvc_data.hashfile.checkout import checkout

        from dvc_data.hashfile.checkout import CheckoutError, LinkError

        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            # state=None: the copy moves to its final place afterwards, so DVC must record nothing.
            checkout(os.fspath(target), LocalFileSystem(), obj, repo.cache.local, state=None)
        except (CheckoutError, LinkError) as exc:
            raise SourceError(f"cannot restore {obj.hash_info.value} into {target.parent}: "
                              f"{' '.join(str(exc).split())}") from exc

    def _uri(self, odb: Any, md5: str) -> str:
        path = odb.oid_to_path(md5)
        return f"s3://{path}" if self._s3 is not None else path

    @contextlib.contextmanager
    def _remote_errors(self, where: str) -> Iterator[None]:
        """Failures of the remote itself (unreachable, refused credentials, missing bucket) as one
        line naming it; the platform's own errors pass through."""
        try:
            yield
        except EmuError:
            raise
        except Exception as exc:  # noqa: BLE001 - DVC, fsspec, aiobotocore and OS errors alike
            reason = " ".join(str(exc).split()) or type(exc).__name__
            endpoint = ""
            if self._s3 is not None:
                from emu.artifacts.s3 import S3Settings

                url = (self._settings or S3Settings()).resolved().endpoint_url
                endpoint = f" at {url}" if url else ""
            hint = ("; check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or S3Settings"
                    if isinstance(exc, PermissionError) and self._s3 is not None else "")
            raise SourceError(f"{where}: DVC remote {self.remote}{endpoint} failed "
                              f"({type(exc).__name__}: {reason}){hint}") from exc


@dataclass(frozen=True)
class RemoteFile:
    """One file of a folder artifact in the remote (ArtifactStore.listing)."""

    relpath: str
    md5: str
    uri: str


def _remote_has(odb: Any, oid: str) -> bool:
    """Whether the remote holds the object. Not `odb.exists`: fsspec's `exists` answers False for
    refused credentials or an unreachable endpoint too, which would read as "never pushed"."""
    try:
        odb.fs.info(odb.oid_to_path(oid))
    except FileNotFoundError:
        return False
    return True


def _hash_info(md5: str) -> Any:
    from dvc_data.hashfile.hash_info import HashInfo

    return HashInfo("md5", md5)


def _cached(cache: Any, md5: str) -> Any:
    """The complete object of `md5` in the cache (a folder with all its files), else None."""
    from dvc_data.hashfile.tree import Tree

    if not cache.exists(md5):
        return None
    if not md5.endswith(".dir"):
        return cache.get(md5)
    try:
        tree = Tree.load(cache, _hash_info(md5))
    except Exception:  # noqa: BLE001 - a damaged listing: fetch it again
        return None
    if all(cache.exists(oid.value) for _, _, oid in tree):
        return tree
    return None


# ---------------------------------------------------------------------------------------------
# Restoring a run


@dataclass(frozen=True)
class PulledArtifact:
    """One artifact of `pull_run`: where it came from and where it was restored."""

    stage: str
    role: str
    type: str | None
    md5: str
    size: int
    nfiles: int
    uri: str | None
    path: str  # relative to the output folder

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def pull_run(run_id: str, out: str | os.PathLike[str], store: ArtifactStore,
             artifacts: Iterable[Any]) -> list[PulledArtifact]:
    """Restore every artifact of a run into `out` (absent or empty): `out/<stage>/<role>/...` and
    `out/manifest.json` (run id, remote, and md5/size/type/uri/path of every artifact).

    `artifacts` are the run's artifacts from the lineage store: objects or mappings with `md5` and
    either `stage` and `role` or a `name` "<stage>/<role>"; `type`, `uri`, `size` and `path` are
    used when present. A folder artifact fills `out/<stage>/<role>/`; a file artifact lands in that
    folder under its original base name (from `path`, else from `uri` when that is the path it was
    written at), else under the role. A recorded size that differs from the restored bytes is an
    error. The manifest is written last: a folder with a manifest is complete.
    """
    # Absolute: the store restores to absolute paths, and `--out DIR` is usually typed relative.
    out = Path(out).expanduser().absolute()
    items = [_describe(item, i) for i, item in enumerate(artifacts)]
    if not items:
        raise SourceError(f"run {run_id} has no artifacts to pull")
    seen: dict[tuple[str, str], str] = {}
    for stage, role, _, md5, *_ in items:
        if (stage, role) in seen:
            raise SourceError(f"run {run_id} lists two artifacts for {stage}/{role} "
                              f"({seen[(stage, role)]} and {md5}); cannot lay both out")
        seen[(stage, role)] = md5
    _require_empty(out)
    out.mkdir(parents=True, exist_ok=True)
    pulled = []
    for stage, role, kind, md5, size, uri, original in items:
        folder = out / stage / role
        filename = None if md5.endswith(".dir") else (Path(original).name if original else role)
        restored = store.pull(md5, folder, filename=filename)
        actual_size, nfiles = _size(restored)
        if size is not None and int(size) != actual_size:
            raise SourceError(f"run {run_id}: artifact {stage}/{role} ({md5}) restored {actual_size} "
                              f"bytes, the lineage store records {size}")
        pulled.append(PulledArtifact(stage=stage, role=role, type=kind, md5=md5, size=actual_size,
                                     nfiles=nfiles, uri=uri, path=restored.relative_to(out).as_posix()))
        log.info("restored %s/%s (%s) into %s", stage, role, md5, restored)
    manifest = {"run_id": run_id, "remote": store.remote, "restored_at": time.time(),
                "artifacts": [p.to_json() for p in pulled]}
    tmp = out / f"{_TMP_PREFIX}{MANIFEST_FILE}"
    tmp.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    os.replace(tmp, out / MANIFEST_FILE)
    return pulled


_SEGMENT_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


def _describe(item: Any, index: int) -> tuple[str, str, str | None, str, int | None, str | None, str | None]:
    """(stage, role, type, md5, size, uri, original path) of one lineage artifact."""
    def get(name: str) -> Any:
        if isinstance(item, Mapping):
            return item.get(name)
        return getattr(item, name, None)

    md5 = get("md5")
    if not md5:
        raise SourceError(f"artifact {index} ({get('name') or item!r}) has no md5; it was never "
                          f"versioned and cannot be restored")
    check_md5(md5)
    stage, role = get("stage"), get("role")
    if not (stage and role):
        name = str(get("name") or "")
        stage, _, role = name.rpartition("/")
        if not stage or not role:
            raise SourceError(f"artifact {md5}: cannot tell its stage and role (name {name!r}; "
                              f"expected '<stage>/<role>' or stage and role fields)")
    for part in (stage, role):
        if not _SEGMENT_RE.match(part) or part in (".", ".."):
            raise SourceError(f"artifact {md5}: {part!r} cannot be a folder name (letters, digits, "
                              f"'.', '_', '-')")
    size, uri, path = get("size"), get("uri"), get("path")
    if path is None and uri and not md5.endswith(".dir"):
        # The lineage store records where the bytes were written (a path or URI); an object URI
        # in the remote ends in the md5 itself and names no file.
        base = str(uri).rstrip("/").rsplit("/", 1)[-1]
        if base and not md5.endswith(base):
            path = base
    return (stage, role, get("type"), md5, None if size is None else int(size), uri, path)


def _size(path: Path) -> tuple[int, int]:
    if path.is_file():
        return path.stat().st_size, 1
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


# ---------------------------------------------------------------------------------------------
# Files and locks


def _existing(path: str | os.PathLike[str]) -> Path:
    source = Path(path).expanduser().absolute()
    if not source.exists():
        raise ConfigError(f"cannot version {path}: it does not exist")
    if not (source.is_file() or source.is_dir()):
        raise ConfigError(f"cannot version {path}: not a regular file or folder")
    return source


def _require_empty(dest: Path) -> None:
    if dest.is_symlink() or (dest.exists() and (not dest.is_dir() or any(dest.iterdir()))):
        raise ConfigError(f"cannot restore into {dest}: it exists and is not an empty folder")


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for %s (another process is using this artifact store)", path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

