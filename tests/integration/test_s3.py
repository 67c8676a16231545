"""emu.artifacts.s3 against a real S3 server (SeaweedFS, one per module via the `s3_server` fixture).

Each test works under its own prefix of the one bucket, so tests do not see each other's objects.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest

from emu.artifacts import s3 as s3mod
from emu.artifacts.s3 import (MANIFEST_NAME, S3Location, S3Settings, download_prefix, resolve_local,
                              upload_folder)
from emu.errors import ConfigError, SourceError

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------
# Helpers


def settings_for(server) -> S3Settings:
    return S3Settings(endpoint_url=server.endpoint_url, region=server.region,
                      access_key_id=server.access_key, secret_access_key=server.secret_key)


@pytest.fixture
def raw(s3_server):
    """A plain boto3 client on the test server, for arranging objects behind the adapter's back."""
    return s3mod.client(settings_for(s3_server))


@pytest.fixture
def uri(s3_server, request) -> str:
    """A fresh prefix per test."""
    return f"s3://{s3_server.bucket}/tests/{request.node.name.replace('[', '-').replace(']', '')}"


@pytest.fixture
def calls(monkeypatch) -> Counter:
    """Counts S3 API calls made by clients the adapter creates (via botocore's event hooks)."""
    counter: Counter = Counter()
    lock = threading.Lock()
    real_client = s3mod.client

    def count(model, **_):
        with lock:
            counter[model.name] += 1

    def counting_client(settings=None):
        s3 = real_client(settings)
        s3.meta.events.register("before-call.s3.*", count)
        return s3

    monkeypatch.setattr(s3mod, "client", counting_client)
    return counter


def make_tree(root: Path) -> dict[str, bytes]:
    """Nested files of several kinds, including one large enough for a multipart upload."""
    rng = __import__("random").Random(0)
    files = {
        "config.json": b'{"hidden_size": 8}\n',
        "empty.txt": b"",
        "name with spaces.txt": b"spaces survive\n",
        "shards/model-00001.bin": rng.randbytes(100_000),
        "shards/model-00002.bin": rng.randbytes(3),
        "shards/deeper/still/optimizer.pt": rng.randbytes(10 * 1024 * 1024),  # > 8 MiB: multipart
        "tokenizer/vocab.txt": "ünïcödé\n".encode(),
    }
    for relative, data in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root except the downloader's manifest and lock."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in (MANIFEST_NAME, ".emu-s3.lock")}


def mtimes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def digest(files: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


# ---------------------------------------------------------------------------------------------
# Round trip, no-op re-download, cache


def test_upload_then_download_is_bit_identical(s3_server, raw, uri, tmp_path, calls):
    source = tmp_path / "source"
    files = make_tree(source)

    keys = upload_folder(source, uri, settings_for(s3_server))

    assert keys == sorted(files)
    location = S3Location.parse(uri)
    listed = raw.list_objects_v2(Bucket=location.bucket, Prefix=location.list_prefix)["Contents"]
    assert sorted(item["Key"] for item in listed) == [location.key(k) for k in sorted(files)]
    assert any("-" in item["ETag"] for item in listed), "the 10 MiB file should be a multipart object"

    dest = tmp_path / "dest"
    dest.mkdir()
    assert download_prefix(uri, dest, settings_for(s3_server)) == dest

    assert digest(tree(dest)) == digest(files)
    assert calls["GetObject"] == len(files)
    assert not [p for p in dest.rglob(".emu-s3-tmp-*")], "no temporary files are left behind"
    umask = os.umask(0o022)
    os.umask(umask)
    assert (dest / "config.json").stat().st_mode & 0o777 == 0o666 & ~umask, "umask applies, not 0600"


def test_second_download_fetches_nothing_and_follows_changes(s3_server, raw, uri, tmp_path, calls):
    settings = settings_for(s3_server)
    source = tmp_path / "source"
    files = make_tree(source)
    upload_folder(source, uri, settings)
    dest = tmp_path / "dest"
    download_prefix(uri, dest, settings)
    first_gets, before = calls["GetObject"], mtimes(dest)
    assert first_gets == len(files)

    download_prefix(uri, dest, settings)

    assert calls["GetObject"] == first_gets, "an unchanged prefix is not fetched again"
    assert mtimes(dest) == before
    assert digest(tree(dest)) == digest(files)

    # One object changes, one disappears, one local file is edited: exactly those are handled.
    location = S3Location.parse(uri)
    raw.put_object(Bucket=location.bucket, Key=location.key("config.json"), Body=b'{"hidden_size": 16}\n')
    raw.delete_object(Bucket=location.bucket, Key=location.key("shards/model-00002.bin"))
    (dest / "tokenizer/vocab.txt").write_bytes(b"edited locally\n")
    (dest / "my-notes.txt").write_bytes(b"not from S3: left alone\n")
    gets = calls["GetObject"]

    download_prefix(uri, dest, settings)

    assert calls["GetObject"] - gets == 2  # config.json (changed remotely) + vocab.txt (edited)
    expected = {**files, "config.json": b'{"hidden_size": 16}\n',
                "my-notes.txt": b"not from S3: left alone\n"}
    del expected["shards/model-00002.bin"]
    assert digest(tree(dest)) == digest(expected)


def test_object_changing_during_download_fails_and_keeps_what_arrived(s3_server, raw, uri, tmp_path,
                                                                      monkeypatch, calls):
    """GETs carry If-Match with the listed ETag: bytes of another version are never recorded."""
    settings = settings_for(s3_server)
    location = S3Location.parse(uri)
    files = {f"part-{i}.bin": bytes([i]) * 1000 for i in range(5)}
    for name, data in files.items():
        raw.put_object(Bucket=location.bucket, Key=location.key(name), Body=data)
    counting_client = s3mod.client

    def client_racing_a_writer(settings=None):
        s3 = counting_client(settings)

        def overwrite_after_listing(**_):
            raw.put_object(Bucket=location.bucket, Key=location.key("part-3.bin"), Body=b"new version")
        s3.meta.events.register("after-call.s3.ListObjectsV2", overwrite_after_listing)
        return s3

    monkeypatch.setattr(s3mod, "client", client_racing_a_writer)
    dest = tmp_path / "dest"
    with pytest.raises(SourceError, match="changed while it was being downloaded") as error:
        download_prefix(uri, dest, settings)
    assert uri in str(error.value)
    assert not (dest / "part-3.bin").exists()
    assert tree(dest) == {k: v for k, v in files.items() if k != "part-3.bin"}

    monkeypatch.setattr(s3mod, "client", counting_client)
    gets = calls["GetObject"]
    download_prefix(uri, dest, settings)
    assert calls["GetObject"] - gets == 1, "only the object that failed is fetched again"
    assert tree(dest) == {**files, "part-3.bin": b"new version"}


def test_concurrent_downloads_into_one_folder_read_the_store_once(s3_server, uri, tmp_path, calls):
    """Several ranks on one node resolving the same checkpoint: one fetches, the others wait."""
    from concurrent.futures import ThreadPoolExecutor

    settings = settings_for(s3_server)
    source = tmp_path / "source"
    files = make_tree(source)
    upload_folder(source, uri, settings)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: resolve_local(uri, tmp_path / "cache", settings), range(4)))
    assert len(set(results)) == 1
    assert digest(tree(results[0])) == digest(files)
    assert calls["GetObject"] == len(files)


def test_resolve_local_downloads_into_the_cache(s3_server, uri, tmp_path, monkeypatch, calls):
    source = tmp_path / "source"
    files = {"model.safetensors": b"weights", "sub/config.json": b"{}"}
    for relative, data in files.items():
        (source / relative).parent.mkdir(parents=True, exist_ok=True)
        (source / relative).write_bytes(data)
    upload_folder(source, uri, settings_for(s3_server))
    location = S3Location.parse(uri)

    # Settings from the standard environment variables, read at call time; cache from EMU_CACHE_DIR.
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("EMU_CACHE_DIR", str(tmp_path / "cache"))
    local = resolve_local(uri)

    assert local == tmp_path.joinpath("cache", "s3", location.bucket, *location.prefix.split("/"))
    assert tree(local) == files
    gets = calls["GetObject"]
    assert resolve_local(uri + "/") == local  # same folder, already cached: nothing fetched
    assert calls["GetObject"] == gets

    explicit = resolve_local(uri, cache_dir=tmp_path / "other", settings=settings_for(s3_server))
    assert explicit == tmp_path.joinpath("other", "s3", location.bucket, *location.prefix.split("/"))
    assert tree(explicit) == files


def test_resolve_local_returns_local_paths_unchanged(tmp_path):
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    assert resolve_local(folder) == folder
    assert resolve_local(str(folder)) == folder


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("bad", ["s3:/x", "s3://", "s3:///prefix", "S3://bucket/x", "http://example.com/x",
                                 "s3://Bad_Bucket/x", "s3://bucket/a/../b", "s3://bucket//a",
                                 "gs://bucket/x"])
def test_malformed_uris_are_config_errors_naming_the_uri(bad, tmp_path):
    with pytest.raises(ConfigError, match="expected|malformed|not valid") as parse_error:
        S3Location.parse(bad)
    assert repr(bad) in str(parse_error.value) or bad in str(parse_error.value)
    for call in (lambda: download_prefix(bad, tmp_path / "d"), lambda: upload_folder(tmp_path, bad),
                 lambda: resolve_local(bad, cache_dir=tmp_path)):
        with pytest.raises(ConfigError) as error:
            call()
        assert bad in str(error.value)
    assert not (tmp_path / "d").exists()


def test_missing_prefix_and_missing_bucket_are_source_errors(s3_server, uri, tmp_path):
    for missing in (uri + "/does/not/exist", "s3://no-such-bucket-here/x"):
        with pytest.raises(SourceError) as error:
            download_prefix(missing, tmp_path / "dest", settings_for(s3_server))
        message = str(error.value)
        assert missing in message and s3_server.endpoint_url in message and "\n" not in message
    assert "does not exist" in message  # the bucket case says so


def test_wrong_credentials_are_a_one_line_source_error(s3_server, uri, tmp_path):
    wrong = S3Settings(endpoint_url=s3_server.endpoint_url, access_key_id="nobody",
                       secret_access_key="s3cr3t-Zq9")
    with pytest.raises(SourceError) as error:
        download_prefix(uri, tmp_path / "dest", wrong)
    message = str(error.value)
    assert "\n" not in message
    assert uri in message and s3_server.endpoint_url in message and "credentials refused" in message
    assert "s3cr3t-Zq9" not in message, "the secret is never echoed"
    with pytest.raises(SourceError, match="credentials refused"):
        upload_folder(REPO / "emu" / "artifacts", uri, wrong)


def test_unreachable_endpoint_is_a_source_error(tmp_path, monkeypatch):
    import socket

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # refused at once; no backoff between retries

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.raises(SourceError, match="cannot reach") as error:
        download_prefix("s3://bucket/x", tmp_path / "d",
                        S3Settings(endpoint_url=endpoint, access_key_id="a", secret_access_key="b"))
    assert endpoint in str(error.value)


def test_keys_escaping_the_destination_are_refused_before_writing(s3_server, raw, uri, tmp_path,
                                                                  monkeypatch):
    """SeaweedFS itself refuses to store `..` keys (PutObject: InvalidRequest), but AWS S3 accepts
    them, so the hostile keys are spliced into a real listing of real objects via a botocore hook."""
    location = S3Location.parse(uri)
    raw.put_object(Bucket=location.bucket, Key=location.key("good.txt"), Body=b"good")
    try:
        raw.put_object(Bucket=location.bucket, Key=location.key("../escape.txt"), Body=b"evil")
        stored_by_server = True
    except Exception:  # noqa: BLE001 - the server refused it: the hook below stands in for AWS
        stored_by_server = False

    real_client = s3mod.client
    for hostile in ("../escape.txt", "a/../../escape.txt", "/etc/escape.txt", "a/./b.txt"):
        def client_listing_hostile_key(settings=None, hostile=hostile):
            s3 = real_client(settings)

            def add_key(parsed, **_):
                parsed.setdefault("Contents", []).append(
                    {"Key": location.key(hostile), "Size": 4, "ETag": '"x"'})
            s3.meta.events.register("after-call.s3.ListObjectsV2", add_key)
            return s3

        monkeypatch.setattr(s3mod, "client", client_listing_hostile_key)
        dest = tmp_path / "area" / "dest"
        with pytest.raises(SourceError) as error:
            download_prefix(uri, dest, settings_for(s3_server))
        message = str(error.value)
        assert repr(location.key(hostile)) in message and "\n" not in message
        assert not (tmp_path / "area").exists(), "nothing is written, inside or outside dest"
    assert not (tmp_path / "escape.txt").exists() and not Path("/etc/escape.txt").exists()

    if stored_by_server:  # a server that keeps `..` keys: the real listing must be refused too
        monkeypatch.setattr(s3mod, "client", real_client)
        with pytest.raises(SourceError, match="escape"):
            download_prefix(uri, tmp_path / "area" / "dest", settings_for(s3_server))
        assert not (tmp_path / "area").exists()


def test_symlinked_folder_leading_out_of_dest_is_refused(s3_server, raw, uri, tmp_path):
    location = S3Location.parse(uri)
    raw.put_object(Bucket=location.bucket, Key=location.key("sub/file.txt"), Body=b"data")
    dest, outside = tmp_path / "dest", tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    (dest / "sub").symlink_to(outside, target_is_directory=True)
    with pytest.raises(SourceError, match="outside"):
        download_prefix(uri, dest, settings_for(s3_server))
    assert list(outside.iterdir()) == []


def test_upload_refuses_symlinks_leaving_the_folder_and_uploads_nothing(s3_server, raw, uri, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"outside")
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_bytes(b"a")
    (folder / "sub" / "link-inside.txt").symlink_to(folder / "a.txt")
    (folder / "sub" / "link-outside.txt").symlink_to(secret)
    location = S3Location.parse(uri)

    with pytest.raises(ConfigError, match="link-outside.txt.*outside"):
        upload_folder(folder, uri, settings_for(s3_server))
    assert raw.list_objects_v2(Bucket=location.bucket, Prefix=location.list_prefix)["KeyCount"] == 0

    (folder / "sub" / "link-outside.txt").unlink()
    (folder / MANIFEST_NAME).write_text("{}")  # bookkeeping of a former download is not uploaded
    assert upload_folder(folder, uri, settings_for(s3_server)) == ["a.txt", "sub/link-inside.txt"]


def test_missing_local_paths_are_config_errors(tmp_path):
    missing = tmp_path / "no" / "such" / "checkpoint"
    with pytest.raises(ConfigError, match="does not exist") as error:
        resolve_local(missing)
    assert str(missing) in str(error.value)
    with pytest.raises(ConfigError, match="does not exist"):
        upload_folder(missing, "s3://bucket/x")


# ---------------------------------------------------------------------------------------------
# Settings


def test_settings_come_from_explicit_values_then_the_environment(monkeypatch):
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    assert S3Settings().resolved() == S3Settings()  # nothing set: boto3's own chain decides

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "env-token")
    from_env = S3Settings().resolved()
    assert (from_env.endpoint_url, from_env.region, from_env.access_key_id, from_env.secret_access_key,
            from_env.session_token) == ("http://127.0.0.1:1", "us-east-1", "env-key", "env-secret",
                                        "env-token")

    explicit = S3Settings(endpoint_url="https://s3.example.com", region="eu-west-1",
                          access_key_id="key", secret_access_key="secret").resolved()
    assert (explicit.endpoint_url, explicit.region, explicit.access_key_id, explicit.session_token) == (
        "https://s3.example.com", "eu-west-1", "key", None)
    assert "secret" not in repr(explicit) and "env-token" not in repr(from_env)

    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ConfigError, match="AWS_SECRET_ACCESS_KEY"):
        S3Settings().resolved()
    with pytest.raises(ConfigError, match="secret_access_key"):
        S3Settings(access_key_id="only-half")
    with pytest.raises(ConfigError, match="endpoint_url"):
        S3Settings(endpoint_url="127.0.0.1:8333")


def test_importing_the_adapter_imports_no_boto3():
    code = ("import sys, emu.artifacts, emu.artifacts.s3; "
            "assert not any(m.split('.')[0] in ('boto3', 'botocore', 'dvc') for m in sys.modules), "
            "sorted(m for m in sys.modules if m.startswith(('boto', 'dvc')))")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_emu_model_loads_from_an_s3_uri(s3_server, tmp_path, monkeypatch):
    """Model-loading code takes local or S3 paths: save, upload, load by s3:// URI, same weights."""
    import torch

    from emu.data.tokenizer import train_tokenizer
    from emu.model.config import EmuConfig
    from emu.model.emu import EmuModel
    from emu.model.io import load_model, save_model

    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("EMU_CACHE_DIR", str(tmp_path / "cache"))
    tok = train_tokenizer(["a red circle"] * 10, 300)
    torch.manual_seed(0)
    model = EmuModel.build(EmuConfig(), tok)
    save_model(model, tok, tmp_path / "model")
    upload_folder(tmp_path / "model", f"s3://{s3_server.bucket}/models/tiny")
    loaded, _ = load_model(f"s3://{s3_server.bucket}/models/tiny")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert (tmp_path / "cache" / "s3" / s3_server.bucket / "models" / "tiny" / "emu.json").is_file()
