"""The boto3 adapter: S3 URIs, settings, folder upload, prefix download, local-or-S3 resolution.

Model and training code call `resolve_local(path_or_uri)` wherever a setting accepts "a local path
or an s3:// URI" (checkpoints, pretrained weights): local paths come back unchanged, S3 prefixes
are mirrored into a local cache folder first.

Downloads are safe to repeat and to interrupt:
- every object streams into a temporary file next to its target and is renamed into place only
  when complete, so a reader never sees a partial file;
- a manifest (`.emu-s3-manifest.json` in the destination) records size and ETag of every object
  fetched, and the local size and mtime it left; an object whose record still matches the listing
  and the file on disk is not fetched again, so a second download is a no-op;
- files that an earlier download of the same URI wrote and that no longer exist under the prefix
  are removed, so the folder mirrors the prefix (files the manifest does not know are left alone);
- keys that would land outside the destination (`..`, absolute, empty segments) are refused
  before anything is written;
- concurrent downloads into one folder (several ranks on one node resolving one checkpoint)
  serialise on a lock file, so the object store is read once.

Settings come from explicit values, else the standard AWS_* variables, read when a client is made
(never at import). Credentials left unset fall through to boto3's own chain (shared config
files, instance or pod roles). boto3 is imported inside functions only (DESIGN.md, conventions 4
and 5).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from collections.abc import Iterator, Mapping
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from emu.errors import ConfigError, SourceError

__all__ = [
    "MANIFEST_NAME", "S3Location", "S3Settings", "client", "default_cache_dir", "delete_object", "download_prefix",
    "has_objects", "resolve_local", "upload_file", "upload_folder",
]

#: Bookkeeping files in a download folder. `upload_folder` skips them, so a folder that was
#: downloaded can be uploaded elsewhere without carrying the first download's state along.
MANIFEST_NAME = ".emu-s3-manifest.json"
_LOCK_NAME = ".emu-s3.lock"
_TMP_PREFIX = ".emu-s3-tmp-"
_MANIFEST_VERSION = 1

_CHUNK_BYTES = 1 << 20
#: Objects fetched at once. Each object is one streamed GET; checkpoints are a handful of large
#: shards or many small files, and 8 streams saturate a node's link in either case.
_DOWNLOAD_WORKERS = 8

# https://docs.aws.amazon.com/AmazonS3/latest/userguide/bucketnamingrules.html (general purpose)
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")
_CREDENTIAL_CODES = {
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
    "InvalidClientTokenId", "UnrecognizedClientException", "AuthorizationHeaderMalformed", "403",
}


# ---------------------------------------------------------------------------------------------
# URIs and settings


@dataclass(frozen=True)
class S3Location:
    """A parsed `s3://bucket/prefix` URI. `prefix` has no leading or trailing slash ("" = bucket)."""

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, uri: str | S3Location) -> S3Location:
        """Parse and validate; a malformed URI raises ConfigError naming it and what is wrong."""
        if isinstance(uri, S3Location):
            return uri
        if not isinstance(uri, str):
            raise ConfigError(f"expected an s3://bucket/prefix URI, got {type(uri).__name__} {uri!r}")
        if not uri.startswith("s3://"):
            if uri[:3].lower() == "s3:":
                raise ConfigError(f"malformed S3 URI {uri!r}: it must start with 's3://' "
                                  f"(lowercase, two slashes), as in s3://bucket/prefix")
            raise ConfigError(f"not an S3 URI: {uri!r}; expected s3://bucket/prefix")
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        if not bucket:
            raise ConfigError(f"malformed S3 URI {uri!r}: no bucket name; expected s3://bucket/prefix")
        if not _BUCKET_RE.match(bucket) or ".." in bucket:
            raise ConfigError(f"malformed S3 URI {uri!r}: bucket name {bucket!r} is not valid (3-63 "
                              f"characters: lowercase letters, digits, '.', '-'; starting and ending "
                              f"with a letter or digit)")
        prefix = prefix.rstrip("/")  # s3://b/p/ and s3://b/p name the same folder
        if prefix:
            problem = _key_problem(prefix)
            if problem:
                raise ConfigError(f"malformed S3 URI {uri!r}: prefix {prefix!r} {problem}")
        return cls(bucket, prefix)

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    @property
    def list_prefix(self) -> str:
        """The ListObjects prefix: with a trailing slash, so `ckpt/v1` never lists `ckpt/v10/`."""
        return f"{self.prefix}/" if self.prefix else ""

    def key(self, relative: str) -> str:
        """The object key of a path relative to this prefix."""
        return f"{self.list_prefix}{relative}"

    def __str__(self) -> str:
        return self.uri


@dataclass(frozen=True)
class S3Settings:
    """How to reach the object store. Every field is optional: unset fields are resolved from the
    standard AWS_* environment variables when a client is made (`resolved`), and credentials left
    unset after that fall through to boto3's default chain (shared config, instance/pod roles)."""

    #: S3 endpoint, e.g. http://127.0.0.1:8333 for SeaweedFS/MinIO; unset = AWS. Environment:
    #: AWS_ENDPOINT_URL_S3, then AWS_ENDPOINT_URL.
    endpoint_url: str | None = None
    #: Region used for signing; environment: AWS_REGION, then AWS_DEFAULT_REGION. With a custom
    #: endpoint and no region, us-east-1 is used (S3-compatible stores accept it).
    region: str | None = None
    #: Access key id; set together with secret_access_key. Environment: AWS_ACCESS_KEY_ID.
    access_key_id: str | None = None
    #: Secret access key. Environment: AWS_SECRET_ACCESS_KEY.
    secret_access_key: str | None = field(default=None, repr=False)
    #: Session token of temporary (STS) credentials; environment: AWS_SESSION_TOKEN. It is taken
    #: from the environment only together with keys from the environment.
    session_token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.endpoint_url is not None and not re.match(r"^https?://[^/]", self.endpoint_url):
            raise ConfigError(f"S3Settings.endpoint_url must be an http:// or https:// URL, got "
                              f"{self.endpoint_url!r}")
        if (self.access_key_id is None) != (self.secret_access_key is None):
            missing = "secret_access_key" if self.secret_access_key is None else "access_key_id"
            raise ConfigError(f"S3Settings.{missing} must be set together with "
                              f"{'access_key_id' if missing == 'secret_access_key' else 'secret_access_key'}")
        if self.session_token is not None and self.access_key_id is None:
            raise ConfigError("S3Settings.session_token needs access_key_id and secret_access_key")

    def resolved(self, environ: Mapping[str, str] | None = None) -> S3Settings:
        """These settings with unset fields filled from the environment (read now)."""
        env = os.environ if environ is None else environ

        def first(*names: str) -> str | None:
            return next((env[name] for name in names if env.get(name)), None)

        endpoint = self.endpoint_url or first("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
        region = self.region or first("AWS_REGION", "AWS_DEFAULT_REGION")
        key, secret, token = self.access_key_id, self.secret_access_key, self.session_token
        if key is None:
            key, secret = first("AWS_ACCESS_KEY_ID"), first("AWS_SECRET_ACCESS_KEY")
            if (key is None) != (secret is None):
                missing = "AWS_SECRET_ACCESS_KEY" if secret is None else "AWS_ACCESS_KEY_ID"
                present = "AWS_ACCESS_KEY_ID" if secret is None else "AWS_SECRET_ACCESS_KEY"
                raise ConfigError(f"{present} is set but {missing} is not; set both or neither")
            token = first("AWS_SESSION_TOKEN") if key is not None else None
        if endpoint and not re.match(r"^https?://[^/]", endpoint):
            raise ConfigError(f"AWS_ENDPOINT_URL must be an http:// or https:// URL, got {endpoint!r}")
        if region is None and endpoint:
            region = "us-east-1"
        return replace(self, endpoint_url=endpoint, region=region, access_key_id=key,
                       secret_access_key=secret, session_token=token)


def client(settings: S3Settings | None = None) -> Any:
    """A boto3 S3 client for these settings (resolved from the environment now).

    Retries follow botocore's standard mode (3 attempts with backoff); AWS_MAX_ATTEMPTS and
    AWS_RETRY_MODE override it as they do for any boto3 client.
    """
    import boto3
    from botocore.config import Config

    resolved = (settings or S3Settings()).resolved()
    options: dict[str, Any] = {
        # Retries: botocore's "standard" mode (3 attempts, backoff) unless AWS_RETRY_MODE says
        # otherwise; AWS_MAX_ATTEMPTS still applies because max_attempts is not pinned here.
        "retries": {} if os.environ.get("AWS_RETRY_MODE") else {"mode": "standard"},
        "connect_timeout": 10,
        "read_timeout": 120,
        "user_agent_extra": "emu-platform",
    }
    if resolved.endpoint_url:
        # S3-compatible stores (SeaweedFS, MinIO, Ceph) serve buckets as paths, not subdomains, and
        # several reject the CRC trailers botocore >= 1.36 sends by default.
        options.update(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                       response_checksum_validation="when_required")
    session = boto3.session.Session()  # own session: the default one is not thread-safe
    return session.client(
        "s3", endpoint_url=resolved.endpoint_url, region_name=resolved.region,
        aws_access_key_id=resolved.access_key_id, aws_secret_access_key=resolved.secret_access_key,
        aws_session_token=resolved.session_token, config=Config(**options))


# ---------------------------------------------------------------------------------------------
# Upload


def upload_folder(local_dir: str | os.PathLike[str], uri: str | S3Location,
                  settings: S3Settings | None = None) -> list[str]:
    """Upload every file under `local_dir` to `uri`; return the keys relative to the prefix, sorted.

    Symbolic links are followed when they stay inside the folder and refused (ConfigError, before
    anything is uploaded) when they point outside it, dangle, or loop. Large files go up as
    multipart uploads. Download bookkeeping files (`MANIFEST_NAME`, lock, temporary files) are
    skipped. Objects already under the prefix are overwritten, never deleted.
    """
    location = S3Location.parse(uri)
    root = Path(local_dir)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise ConfigError(f"cannot upload {root} to {location}: the local path {what}")
    files = _collect_files(root)
    if not files:
        raise ConfigError(f"cannot upload {root} to {location}: the folder holds no files")

    from boto3.s3.transfer import TransferConfig, create_transfer_manager

    s3 = client(settings)
    with _s3_errors(f"cannot upload {root} to {location} at {s3.meta.endpoint_url}"):
        # One transfer manager for all files: files are opened lazily, parts go up in parallel.
        manager = create_transfer_manager(s3, TransferConfig(preferred_transfer_client="classic"))
        with manager:
            futures = [manager.upload(str(path), location.bucket, location.key(relative))
                       for relative, path in files]
            for future in futures:
                future.result()
    return [relative for relative, _ in files]


def _collect_files(root: Path) -> list[tuple[str, Path]]:
    """(relative posix path, path) of every regular file under root, sorted by relative path."""
    root_real = root.resolve()
    found: list[tuple[str, Path]] = []

    def walk(folder: Path, parts: tuple[str, ...], ancestors: frozenset[Path]) -> None:
        with os.scandir(folder) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                path, relative = Path(entry.path), (*parts, entry.name)
                if _is_bookkeeping(relative):
                    continue
                if entry.is_symlink():
                    target = path.resolve()
                    if not target.exists():
                        raise ConfigError(f"cannot upload {root}: symbolic link {path} is dangling "
                                          f"(points to {os.readlink(path)})")
                    if not target.is_relative_to(root_real):
                        raise ConfigError(f"cannot upload {root}: symbolic link {path} points outside "
                                          f"the folder (to {target}); copy the file in or remove "
                                          f"the link")
                if entry.is_dir():
                    real = path.resolve()
                    if real in ancestors:
                        raise ConfigError(f"cannot upload {root}: symbolic link {path} loops back "
                                          f"to {real}")
                    walk(path, relative, ancestors | {real})
                elif entry.is_file():
                    found.append(("/".join(relative), path))
                else:
                    raise ConfigError(f"cannot upload {root}: {path} is not a regular file or folder")

    walk(root, (), frozenset({root_real}))
    return sorted(found)


def _is_bookkeeping(relative: tuple[str, ...]) -> bool:
    if relative[-1].startswith(_TMP_PREFIX):
        return True
    return len(relative) == 1 and relative[0] in (MANIFEST_NAME, _LOCK_NAME)


# ---------------------------------------------------------------------------------------------
# Download


@dataclass(frozen=True)
class _Object:
    key: str
    relative: str
    size: int
    etag: str


def download_prefix(uri: str | S3Location, dest_dir: str | os.PathLike[str],
                    settings: S3Settings | None = None) -> Path:
    """Mirror every object under `uri` into `dest_dir` (created if needed); return `dest_dir`.

    Objects already downloaded with the same size and ETag (and untouched on disk since) are not
    fetched again. Raises SourceError (one line, naming the URI and the endpoint) when the bucket
    or prefix does not exist or is empty, credentials are refused, the endpoint cannot be reached,
    or a key would land outside `dest_dir`; in the last case nothing is written.
    """
    location = S3Location.parse(uri)
    dest = Path(dest_dir)
    s3 = client(settings)
    endpoint = s3.meta.endpoint_url
    where = f"cannot download {location} from {endpoint}"
    with _s3_errors(where):
        objects = _list_objects(s3, location, where)
    _check_layout(objects, where)

    dest.mkdir(parents=True, exist_ok=True)
    dest_real = dest.resolve()
    for obj in objects:  # symlinked folders already in dest must not lead the writes elsewhere
        if not (dest / obj.relative).parent.resolve().is_relative_to(dest_real):
            raise SourceError(f"{where}: key {obj.key!r} would be written outside {dest} "
                              f"(through a symbolic link); refusing")

    with _locked(dest / _LOCK_NAME):
        previous = _read_manifest(dest, location, endpoint)
        listed = {obj.relative for obj in objects}
        # Entries of files that left the prefix survive a failed run, so a later run removes them.
        entries = {rel: entry for rel, entry in previous.items() if rel not in listed}
        todo = []
        for obj in objects:
            if _up_to_date(dest / obj.relative, obj, previous.get(obj.relative)):
                entries[obj.relative] = previous[obj.relative]
            else:
                todo.append(obj)
        try:
            with _s3_errors(where):
                _fetch_all(s3, location, dest, todo, entries, where)
            for relative in sorted(set(entries) - listed):
                stale = dest / relative
                if stale.is_file() and not stale.is_symlink():
                    stale.unlink()
                del entries[relative]
        finally:
            if entries != previous:  # an unchanged folder is left untouched, manifest included
                _write_manifest(dest, location, endpoint, entries)
    return dest


def upload_file(path: str | os.PathLike[str], uri: str | S3Location, settings: S3Settings | None = None) -> None:
    """Upload one local file to the object `uri` (multipart when large)."""
    location = S3Location.parse(uri)
    s3 = client(settings)
    with _s3_errors(f"cannot upload {path} to {location} at {s3.meta.endpoint_url}"):
        s3.upload_file(str(path), location.bucket, location.prefix)


def has_objects(uri: str | S3Location, settings: S3Settings | None = None) -> bool:
    """Whether anything is stored under the prefix `uri` (a first attempt finds nothing to resume)."""
    location = S3Location.parse(uri)
    s3 = client(settings)
    with _s3_errors(f"cannot list {location} at {s3.meta.endpoint_url}"):
        listing = s3.list_objects_v2(Bucket=location.bucket, Prefix=location.prefix + "/", MaxKeys=1)
    return bool(listing.get("KeyCount"))


def delete_object(uri: str | S3Location, settings: S3Settings | None = None) -> None:
    """Delete the object `uri` names (no error when it is absent)."""
    location = S3Location.parse(uri)
    s3 = client(settings)
    with _s3_errors(f"cannot delete {location} at {s3.meta.endpoint_url}"):
        s3.delete_object(Bucket=location.bucket, Key=location.prefix)


def _list_objects(s3: Any, location: S3Location, where: str) -> list[_Object]:
    objects = []
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=location.bucket, Prefix=location.list_prefix):
        for item in page.get("Contents", []):
            key, size = item["Key"], int(item["Size"])
            relative = key[len(location.list_prefix):]
            if key.endswith("/") and size == 0:
                continue  # a "folder" marker written by consoles and some tools, not a file
            problem = _key_problem(relative)
            if problem:
                raise SourceError(f"{where}: refusing object key {key!r}: it {problem} and would not "
                                  f"stay inside the destination folder")
            if relative in (MANIFEST_NAME, _LOCK_NAME) or relative.rsplit("/", 1)[-1].startswith(_TMP_PREFIX):
                raise SourceError(f"{where}: object key {key!r} clashes with the downloader's own "
                                  f"bookkeeping file; rename the object")
            objects.append(_Object(key, relative, size, item.get("ETag", "")))
    if not objects:
        raise SourceError(f"{where}: no objects under this prefix (it does not exist or is empty)")
    return sorted(objects, key=lambda obj: obj.relative)


def _key_problem(relative: str) -> str | None:
    """Why a key (relative to its prefix) is unsafe as a relative path, or None when it is fine."""
    if relative.startswith("/"):
        return "is absolute"
    if "\\" in relative:
        return "contains a backslash"
    if any(ord(char) < 32 for char in relative):
        return "contains a control character"
    parts = relative.split("/")
    if ".." in parts:
        return "contains a '..' segment"
    if "." in parts:
        return "contains a '.' segment"
    if "" in parts:
        return "contains an empty segment ('//' or a trailing '/')"
    return None


def _check_layout(objects: list[_Object], where: str) -> None:
    """Refuse keys that cannot all be files at once (`a` and `a/b`)."""
    files = {obj.relative: obj.key for obj in objects}
    for obj in objects:
        parent = PurePosixPath(obj.relative).parent
        while str(parent) != ".":
            if str(parent) in files:
                raise SourceError(f"{where}: object {files[str(parent)]!r} and object {obj.key!r} "
                                  f"cannot both be written (one would have to be a file and a folder)")
            parent = parent.parent


def _up_to_date(path: Path, obj: _Object, entry: dict[str, Any] | None) -> bool:
    if not entry or entry.get("size") != obj.size or entry.get("etag") != obj.etag:
        return False
    try:
        stat = path.lstat()
    except OSError:
        return False
    return (path.is_file() and not path.is_symlink() and stat.st_size == obj.size
            and stat.st_mtime_ns == entry.get("mtime_ns"))


def _fetch_all(s3: Any, location: S3Location, dest: Path, todo: list[_Object],
               entries: dict[str, Any], where: str) -> None:
    if not todo:
        return
    pool = ThreadPoolExecutor(max_workers=min(_DOWNLOAD_WORKERS, len(todo)),
                              thread_name_prefix="emu-s3-download")
    futures = {pool.submit(_fetch, s3, location, dest, obj, where): obj for obj in todo}
    try:
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for future in done:
            future.result()  # the first failure propagates; otherwise every future is done
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for future, obj in futures.items():  # record every object that did arrive
            if future.done() and not future.cancelled() and future.exception() is None:
                entries[obj.relative] = future.result()


def _fetch(s3: Any, location: S3Location, dest: Path, obj: _Object, where: str) -> dict[str, Any]:
    """Stream one object into a temporary file beside its target, then rename it into place."""
    target = dest / obj.relative
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            # IfMatch: the bytes must be those of the listed version, or the manifest would lie.
            extra = {"IfMatch": obj.etag} if obj.etag else {}
            response = s3.get_object(Bucket=location.bucket, Key=obj.key, **extra)
            written = 0
            for chunk in response["Body"].iter_chunks(_CHUNK_BYTES):
                out.write(chunk)
                written += len(chunk)
            out.flush()
            os.fsync(out.fileno())  # the rename below must never expose unwritten blocks
        if written != obj.size:
            raise SourceError(f"{where}: object {obj.key!r} arrived with {written} bytes, the "
                              f"listing says {obj.size}; try again")
        os.replace(tmp, target)
        return {"size": obj.size, "etag": obj.etag, "mtime_ns": target.stat().st_mtime_ns}
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _create_temp(folder: Path) -> tuple[int, Path]:
    """A new temporary file in `folder`, with the permissions the umask gives (mkstemp's are 0600)."""
    while True:
        path = folder / f"{_TMP_PREFIX}{secrets.token_hex(8)}"
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:
            continue


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    import fcntl

    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_manifest(dest: Path, location: S3Location, endpoint: str) -> dict[str, Any]:
    """Entries of the manifest when it describes this URI at this endpoint, else none."""
    try:
        data = json.loads((dest / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return {}  # no manifest or a damaged one: everything is fetched again, nothing is lost
    if (not isinstance(data, dict) or data.get("version") != _MANIFEST_VERSION
            or data.get("uri") != location.uri or data.get("endpoint") != endpoint
            or not isinstance(data.get("objects"), dict)):
        return {}
    return data["objects"]


def _write_manifest(dest: Path, location: S3Location, endpoint: str, entries: dict[str, Any]) -> None:
    data = {"version": _MANIFEST_VERSION, "uri": location.uri, "endpoint": endpoint,
            "objects": dict(sorted(entries.items()))}
    fd, tmp = _create_temp(dest)
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(data, out, indent=1)
        os.replace(tmp, dest / MANIFEST_NAME)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# Local or S3


def default_cache_dir() -> Path:
    """`$EMU_CACHE_DIR`, else `~/.cache/emu` (read at call time)."""
    return Path(os.environ.get("EMU_CACHE_DIR") or "~/.cache/emu").expanduser()


def resolve_local(path_or_uri: str | os.PathLike[str] | S3Location,
                  cache_dir: str | os.PathLike[str] | None = None,
                  settings: S3Settings | None = None) -> Path:
    """A local folder or file for a setting that takes "a local path or an s3:// URI".

    A local path is returned as given (`~` expanded); it must exist (ConfigError naming it). An
    s3:// URI is downloaded (see `download_prefix`) into `<cache_dir>/s3/<bucket>/<prefix>`, with
    `cache_dir` defaulting to `default_cache_dir()`, and that folder is returned. Any other
    scheme (http://, gs://, a malformed s3:/...) is a ConfigError.
    """
    if isinstance(path_or_uri, S3Location):
        location = path_or_uri
    else:
        text = os.fspath(path_or_uri)
        if not _SCHEME_RE.match(text):
            path = Path(text).expanduser()
            if not path.exists():
                raise ConfigError(f"local path {text} does not exist")
            return path
        if not text.lower().startswith("s3:"):
            raise ConfigError(f"unsupported URI {text!r}: expected a local path or s3://bucket/prefix")
        location = S3Location.parse(text)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    dest = root.joinpath("s3", location.bucket, *location.prefix.split("/")) if location.prefix \
        else root / "s3" / location.bucket
    return download_prefix(location, dest, settings)


def resolve_local_file(path_or_uri: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None,
                       settings: S3Settings | None = None) -> Path:
    """A local file for a setting that takes "a local file or an s3:// URI of one" (a pretrained
    checkpoint file such as EVA-CLIP's). A local path must be a file (ConfigError naming it). An
    s3:// URI names one object, downloaded to `<cache_dir>/s3/<bucket>/<key>` unless the copy
    there has the object's size and ETag (a sidecar records them), under the same lock as
    `download_prefix`."""
    text = os.fspath(path_or_uri)
    if not _SCHEME_RE.match(text):
        path = Path(text).expanduser()
        if not path.is_file():
            raise ConfigError(f"local file {text} {'is a folder' if path.is_dir() else 'does not exist'}")
        return path
    if not text.lower().startswith("s3:"):
        raise ConfigError(f"unsupported URI {text!r}: expected a local file or s3://bucket/key")
    location = S3Location.parse(text)
    if not location.prefix:
        raise ConfigError(f"{text} names a bucket, not an object: expected s3://bucket/key")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root.joinpath("s3", location.bucket, *location.prefix.split("/"))
    parent_prefix = location.prefix.rpartition("/")[0]
    s3 = client(settings)
    where = f"cannot download {location} from {s3.meta.endpoint_url}"
    from botocore.exceptions import ClientError

    try:
        with _s3_errors(where):
            head = s3.head_object(Bucket=location.bucket, Key=location.prefix)
    except SourceError as exc:
        cause = exc.__cause__
        if isinstance(cause, ClientError) and str(cause.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey"):
            raise SourceError(f"{where}: no such object") from None
        raise
    obj = _Object(location.prefix, target.name, int(head["ContentLength"]), head.get("ETag", ""))
    target.parent.mkdir(parents=True, exist_ok=True)
    sidecar = target.parent / f".emu-s3-file-{target.name}.json"
    with _locked(target.parent / _LOCK_NAME):
        try:
            entry = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            entry = None
        if not _up_to_date(target, obj, entry if isinstance(entry, dict) else None):
            with _s3_errors(where):
                entry = _fetch(s3, S3Location(location.bucket, parent_prefix), target.parent, obj, where)
            sidecar.write_text(json.dumps(entry))
    return target


# ---------------------------------------------------------------------------------------------
# Errors


@contextlib.contextmanager
def _s3_errors(where: str) -> Iterator[None]:
    """Turn botocore failures into one-line SourceErrors that start with `where`."""
    from botocore.exceptions import (BotoCoreError, ClientError, EndpointConnectionError,
                                     NoCredentialsError)
    from botocore.exceptions import ConnectionError as BotoConnectionError

    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "")) or "unknown"
        message = str(error.get("Message", "")) or str(exc)
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchBucket",) or (code == "404" and exc.operation_name == "HeadBucket"):
            reason = "the bucket does not exist"
        elif code in _CREDENTIAL_CODES or status == 403:
            reason = (f"credentials refused ({code}: {message}); check AWS_ACCESS_KEY_ID and "
                      f"AWS_SECRET_ACCESS_KEY or S3Settings")
        elif code in ("PreconditionFailed", "412"):
            reason = "an object changed while it was being downloaded; run again"
        elif code in ("NoSuchKey", "404"):
            reason = f"an object disappeared while it was being read ({message}); run again"
        else:
            reason = f"{exc.operation_name} failed ({code}: {message})"
        raise SourceError(_one_line(f"{where}: {reason}")) from exc
    except NoCredentialsError as exc:
        raise SourceError(f"{where}: no credentials found; set AWS_ACCESS_KEY_ID and "
                          f"AWS_SECRET_ACCESS_KEY or pass S3Settings") from exc
    except (EndpointConnectionError, BotoConnectionError) as exc:
        raise SourceError(_one_line(f"{where}: cannot reach the endpoint ({exc})")) from exc
    except BotoCoreError as exc:
        raise SourceError(_one_line(f"{where}: {exc}")) from exc


def _one_line(text: str) -> str:
    return " ".join(text.split())
