"""emu.artifacts.dvc against real DVC: a local-folder remote, a real S3 remote (SeaweedFS via the
`s3_server` fixture), the `dvc` CLI itself, and `dvc repro` of the repository's dvc.yaml.

Every test runs with its own EMU_HOME and its own DVC global/system config and site-cache folders,
so nothing here reads or writes ~/.emu, ~/.config/dvc or /var/tmp/dvc.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from emu.artifacts.dvc import ArtifactNotFoundError, ArtifactRef, ArtifactStore, pull_run
from emu.errors import ConfigError, SourceError

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DVC = BIN / "dvc"
EMU = BIN / "emu"


# ---------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Own EMU_HOME and DVC config/site-cache folders; no remote chosen from the environment."""
    home = tmp_path / "emu-home"
    monkeypatch.setenv("EMU_HOME", str(home))
    monkeypatch.delenv("EMU_DVC_REMOTE", raising=False)
    for name, folder in (("DVC_GLOBAL_CONFIG_DIR", "dvc-global"), ("DVC_SYSTEM_CONFIG_DIR", "dvc-system")):
        monkeypatch.setenv(name, str(tmp_path / folder))
    monkeypatch.delenv("DVC_SITE_CACHE_DIR", raising=False)  # it would override the store's own
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    return home


def make_tree(root: Path, seed: int = 0) -> dict[str, bytes]:
    """Nested files of several kinds: empty, unicode and spaced names, one > 2 MiB (DVC hashes
    files above 2 MiB on its thread pool), deep nesting."""
    rng = random.Random(seed)
    files = {
        "config.json": b'{"hidden_size": 8}\n',
        "empty.txt": b"",
        "name with spaces.txt": b"spaces survive\n",
        "tokenizer/vocab ünïcödé.txt": "ünïcödé\n".encode(),
        "shards/00000.tar": rng.randbytes(100_000),
        "shards/00001.tar": rng.randbytes(3 * 1024 * 1024),
        "a/b/c/d/deep.bin": rng.randbytes(17),
        "crlf.txt": b"dos\r\nline endings\r\n",  # DVC 3 hashes bytes as they are (no dos2unix)
    }
    for relative, data in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def remote_objects(remote: Path) -> dict[str, int]:
    """Every object in a local remote, with its mtime (a rewrite changes it)."""
    return {p.relative_to(remote).as_posix(): p.stat().st_mtime_ns for p in remote.rglob("*") if p.is_file()}


def dvc(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # DVC keeps a project's state under /var/tmp/dvc unless told otherwise.
    run_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               "DVC_SITE_CACHE_DIR": str(cwd.parent / f"{cwd.name}-dvc-site"), **(env or {})}
    proc = subprocess.run([str(DVC), *args], cwd=cwd, env=run_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


# ---------------------------------------------------------------------------------------------
# md5


def test_md5_is_the_dvc_add_value_under_any_path(tmp_path, isolated):
    files = make_tree(tmp_path / "one" / "model")
    make_tree(tmp_path / "two" / "deeper" / "renamed")
    # DVC's own ignore rules, as in `dvc add`: VCS folders inside an artifact are not part of it.
    (tmp_path / "one" / "model" / ".git").mkdir()
    (tmp_path / "one" / "model" / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    store = ArtifactStore(workdir=tmp_path / "wd-a")
    md5 = store.md5(tmp_path / "one" / "model")
    assert md5.endswith(".dir") and len(md5) == 36
    # Another path, another workdir (another machine): the same value.
    assert ArtifactStore(workdir=tmp_path / "wd-b").md5(tmp_path / "two" / "deeper" / "renamed") == md5
    assert store.md5(tmp_path / "one" / "model" / "crlf.txt") == hashlib.md5(files["crlf.txt"]).hexdigest()

    # What `dvc add` records for the same folder in a DVC project.
    project = tmp_path / "project"
    project.mkdir()
    dvc("init", "--no-scm", "-q", cwd=project)
    shutil.copytree(tmp_path / "one" / "model", project / "model")
    dvc("add", "-q", "model", cwd=project)
    out = yaml.safe_load((project / "model.dvc").read_text())["outs"][0]
    assert out["md5"] == md5
    assert (out["size"], out["nfiles"]) == (sum(map(len, files.values())), len(files))

    # Any change of content or of a name is a new md5.
    (tmp_path / "two" / "deeper" / "renamed" / "empty.txt").rename(tmp_path / "two" / "deeper" / "renamed" / "e.txt")
    assert store.md5(tmp_path / "two" / "deeper" / "renamed") != md5
    (tmp_path / "one" / "model" / "config.json").write_bytes(b'{"hidden_size": 9}\n')
    assert store.md5(tmp_path / "one" / "model") != md5

    # Hashing wrote nothing next to the data; DVC's state lives in the workdir only.
    assert sorted(p.name for p in (tmp_path / "one" / "model").iterdir()) == sorted(
        {".git", *(f.split("/")[0] for f in files)})
    assert (tmp_path / "wd-a" / ".dvc").is_dir() and (tmp_path / "wd-a" / "site").is_dir()
    assert not isolated.exists(), "an explicit workdir and no push: nothing under EMU_HOME"


def test_md5_of_missing_path_and_dvcignore_inside_are_config_errors(tmp_path):
    store = ArtifactStore(workdir=tmp_path / "wd")
    with pytest.raises(ConfigError, match="does not exist") as error:
        store.md5(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(error.value)
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / ".dvcignore").write_text("*.tmp\n")
    with pytest.raises(ConfigError, match=r"\.dvcignore"):
        store.push(tmp_path / "art")


# ---------------------------------------------------------------------------------------------
# Push and pull, local remote


def test_push_pull_local_remote_is_bit_identical_and_pushing_twice_uploads_nothing(tmp_path, isolated):
    files = make_tree(tmp_path / "model")
    store = ArtifactStore()  # the defaults: <EMU_HOME>/dvc-remote and <EMU_HOME>/dvc-state
    remote = isolated / "dvc-remote"
    assert (store.remote, store.workdir) == (str(remote), isolated / "dvc-state")

    ref = store.push(tmp_path / "model")
    assert ref == ArtifactRef(md5=store.md5(tmp_path / "model"), size=sum(map(len, files.values())),
                              uri=str(remote / "files" / "md5" / ref.md5[:2] / ref.md5[2:]), nfiles=len(files))
    assert Path(ref.uri).is_file() and store.exists(ref.md5)
    objects = remote_objects(remote)
    # One object per distinct file content, plus the .dir listing.
    assert len(objects) == len(set(files.values())) + 1

    time.sleep(0.01)
    assert store.push(tmp_path / "model") == ref
    assert remote_objects(remote) == objects, "the second push rewrote objects"

    # A fresh machine: another workdir (empty cache), the same remote.
    fresh = ArtifactStore(str(remote), workdir=tmp_path / "fresh-wd")
    restored = fresh.pull(ref.md5, tmp_path / "restored" / "model")
    assert restored == tmp_path / "restored" / "model"
    assert read_tree(restored) == files
    assert [p for p in restored.rglob("*") if p.is_file() and p.stat().st_nlink != 1] == [], \
        "restored files must be copies, never links into DVC's cache"
    (restored / "config.json").write_bytes(b"edited")  # editing a restored file cannot hurt the cache
    empty = tmp_path / "empty"
    empty.mkdir()
    assert read_tree(fresh.pull(ref.md5, empty)) == files
    assert remote_objects(remote) == objects, "pulling never writes to the remote"

    # A file artifact lands in the folder under the name given.
    file_ref = store.push(tmp_path / "model" / "shards" / "00001.tar")
    assert (file_ref.nfiles, file_ref.size) == (1, 3 * 1024 * 1024)
    assert file_ref.md5 == hashlib.md5(files["shards/00001.tar"]).hexdigest()
    path = fresh.pull(file_ref.md5, tmp_path / "file-out", filename="shard.tar")
    assert path == tmp_path / "file-out" / "shard.tar" and path.read_bytes() == files["shards/00001.tar"]

    with pytest.raises(ConfigError, match="not an empty folder"):
        fresh.pull(ref.md5, empty)
    assert read_tree(empty) == files
    leftovers = [p.name for p in tmp_path.rglob(".emu-dvc-tmp-*")]
    assert leftovers == []

    # The remote is a plain DVC remote: a DVC project pulls the artifact by md5, no emu involved.
    project = tmp_path / "project"
    project.mkdir()
    dvc("init", "--no-scm", "-q", cwd=project)
    dvc("remote", "add", "-d", "emu", str(remote), cwd=project)
    (project / "model.dvc").write_text(yaml.safe_dump({"outs": [{"md5": ref.md5, "path": "model", "hash": "md5"}]}))
    dvc("pull", cwd=project)
    assert read_tree(project / "model") == files


def test_pull_of_unknown_or_incomplete_md5_is_a_clear_error(tmp_path):
    remote = tmp_path / "remote"
    store = ArtifactStore(str(remote), workdir=tmp_path / "wd")
    unknown = "0123456789abcdef0123456789abcdef.dir"
    with pytest.raises(ArtifactNotFoundError) as error:
        store.pull(unknown, tmp_path / "out")
    assert unknown in str(error.value) and str(remote) in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()
    assert not store.exists(unknown)
    with pytest.raises(ConfigError, match="not a DVC md5"):
        store.pull("not-an-md5", tmp_path / "out")

    # A listing whose file objects are gone (interrupted or pruned remote): refused, not half-restored.
    make_tree(tmp_path / "art")
    ref = store.push(tmp_path / "art")
    objects = sorted(p for p in remote.rglob("*") if p.is_file() and not p.name.endswith(".dir"))
    objects[0].chmod(0o644)
    objects[0].unlink()
    assert not store.exists(ref.md5)
    fresh = ArtifactStore(str(remote), workdir=tmp_path / "fresh-wd")
    with pytest.raises(ArtifactNotFoundError, match="incomplete") as error:
        fresh.pull(ref.md5, tmp_path / "out")
    assert ref.md5 in str(error.value)
    assert not (tmp_path / "out").exists()
    store.push(tmp_path / "art")  # pushing again repairs it
    assert store.exists(ref.md5)
    assert read_tree(fresh.pull(ref.md5, tmp_path / "out")) == read_tree(tmp_path / "art")

    # The CLI: one line on stderr naming the md5, exit 2.
    proc = subprocess.run([str(EMU), "artifacts", "get", unknown, "--out", str(tmp_path / "cli-out"),
                           "--remote", str(remote)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"error: artifact {unknown} is not in the remote" in proc.stderr and "Traceback" not in proc.stderr


_PUSHER = """
import json, sys, time
from emu.artifacts.dvc import ArtifactStore
remote, workdir, start, *paths = sys.argv[1:]
while time.time() < float(start):
    time.sleep(0.005)
store = ArtifactStore(remote, workdir=workdir)
print(json.dumps([store.push(p).to_json() for p in paths]))
"""


def test_concurrent_pushes_from_separate_processes_all_succeed(tmp_path):
    """Three processes push at the same moment into one remote: two share a workdir (kfp.local's
    case: one EMU_HOME), one has its own (another machine). The trees share most objects."""
    shared = make_tree(tmp_path / "shared")
    trees = []
    for i in range(3):
        root = tmp_path / f"own{i}"
        make_tree(root, seed=0)  # same bytes as `shared`...
        (root / "unique.bin").write_bytes(random.Random(100 + i).randbytes(500_000))  # ...and one of its own
        trees.append(root)
    remote = tmp_path / "remote"
    workdirs = [tmp_path / "wd-shared", tmp_path / "wd-shared", tmp_path / "wd-own"]
    start = time.time() + 3.0  # every process is up by then; they import DVC at their first push
    procs = [subprocess.Popen([sys.executable, "-c", _PUSHER, str(remote), str(workdir), str(start),
                               str(tmp_path / "shared"), str(tree)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for workdir, tree in zip(workdirs, trees)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    assert len({r[0]["md5"] for r in results}) == 1, "the shared tree has one md5 whoever pushes it"
    store = ArtifactStore(str(remote), workdir=tmp_path / "reader")
    for i, (shared_ref, own_ref) in enumerate(results):
        assert store.exists(own_ref["md5"])
        restored = read_tree(store.pull(own_ref["md5"], tmp_path / "check" / str(i)))
        assert restored == read_tree(trees[i])
    assert read_tree(store.pull(results[0][0]["md5"], tmp_path / "check" / "shared")) == shared
    # One object per distinct content (the shared files once), one listing per distinct tree, and
    # no temporary files left behind by the writers.
    assert len(remote_objects(remote)) == len(set(shared.values())) + 3 + 4
    assert not [p for p in remote.rglob("*") if ".tmp" in p.name]


# ---------------------------------------------------------------------------------------------
# S3 remote


def test_push_pull_on_a_real_s3_remote(s3_server, tmp_path, monkeypatch):
    from emu.artifacts.s3 import S3Location, S3Settings, client

    for name, value in s3_server.env().items():  # endpoint and credentials from AWS_* only
        monkeypatch.setenv(name, value)
    uri = f"s3://{s3_server.bucket}/dvc/{tmp_path.name}"
    files = make_tree(tmp_path / "model")
    store = ArtifactStore(uri, workdir=tmp_path / "wd")
    ref = store.push(tmp_path / "model")
    assert ref.md5 == store.md5(tmp_path / "model")
    assert ref.uri == f"{uri}/files/md5/{ref.md5[:2]}/{ref.md5[2:]}"
    assert store.exists(ref.md5)

    s3 = client(S3Settings())
    location = S3Location.parse(uri)

    def listing() -> dict[str, tuple[str, object]]:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=location.bucket, Prefix=location.list_prefix)
        return {o["Key"]: (o["ETag"], o["LastModified"]) for page in pages for o in page.get("Contents", [])}

    before = listing()
    assert len(before) == len(set(files.values())) + 1
    assert f"{location.prefix}/files/md5/{ref.md5[:2]}/{ref.md5[2:]}" in before
    time.sleep(1.1)  # S3 LastModified has a one-second resolution: a rewrite would show
    assert store.push(tmp_path / "model") == ref
    assert listing() == before, "the second push uploaded objects again"

    fresh = ArtifactStore(uri, workdir=tmp_path / "fresh-wd")
    assert read_tree(fresh.pull(ref.md5, tmp_path / "restored")) == files
    assert not fresh.exists("f" * 32)
    with pytest.raises(ArtifactNotFoundError, match="f" * 32):
        fresh.pull("f" * 32, tmp_path / "nothing")

    # Refused credentials are a one-line error naming the remote, not "never pushed".
    wrong = S3Settings(endpoint_url=s3_server.endpoint_url, access_key_id="nobody", secret_access_key="s3cr3t-Zq9")
    for call in (lambda s: s.exists(ref.md5), lambda s: s.pull(ref.md5, tmp_path / "denied"),
                 lambda s: s.push(tmp_path / "model")):
        with pytest.raises(SourceError) as error:
            call(ArtifactStore(uri, workdir=tmp_path / "wd-denied", settings=wrong))
        message = str(error.value)
        assert not isinstance(error.value, ArtifactNotFoundError)
        assert uri in message and "PermissionError" in message and "AWS_ACCESS_KEY_ID" in message
        assert "s3cr3t" not in message and "\n" not in message
    assert not (tmp_path / "denied").exists()

    # Credentials never reach DVC's files on disk.
    on_disk = "".join(p.read_text(errors="ignore") for p in (tmp_path / "wd").rglob("*")
                      if p.is_file() and p.stat().st_size < 1_000_000)
    assert s3_server.secret_key not in on_disk


# ---------------------------------------------------------------------------------------------
# Restoring a run


def test_pull_run_lays_out_stage_role_folders_and_a_manifest(tmp_path, monkeypatch):
    store = ArtifactStore(str(tmp_path / "remote"), workdir=tmp_path / "wd")
    model = make_tree(tmp_path / "run" / "stage1-model", seed=1)
    data = make_tree(tmp_path / "run" / "dataset", seed=2)
    (tmp_path / "run" / "report.json").write_text('{"vqav2": 0.5}\n')
    refs = {name: store.push(tmp_path / "run" / name) for name in ("stage1-model", "dataset", "report.json")}
    # What the lineage store lists for a run (objects or mappings).
    artifacts = [
        {"stage": "stage1", "role": "model", "type": "model", **refs["stage1-model"].to_json()},
        {"name": "prepare/dataset", "type": "dataset", "md5": refs["dataset"].md5, "size": refs["dataset"].size},
        {"stage": "evaluate", "role": "report", "type": "metrics", "md5": refs["report.json"].md5,
         "uri": str(tmp_path / "run" / "report.json")},
    ]
    out = tmp_path / "restored"
    pulled = pull_run("run-1", out, ArtifactStore(str(tmp_path / "remote"), workdir=tmp_path / "fresh"), artifacts)
    assert [p.path for p in pulled] == ["stage1/model", "prepare/dataset", "evaluate/report/report.json"]
    assert read_tree(out / "stage1" / "model") == model
    assert read_tree(out / "prepare" / "dataset") == data
    assert (out / "evaluate" / "report" / "report.json").read_text() == '{"vqav2": 0.5}\n'
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["run_id"] == "run-1" and manifest["remote"] == str(tmp_path / "remote")
    assert [(a["stage"], a["role"], a["type"], a["md5"], a["size"]) for a in manifest["artifacts"]] == [
        ("stage1", "model", "model", refs["stage1-model"].md5, refs["stage1-model"].size),
        ("prepare", "dataset", "dataset", refs["dataset"].md5, refs["dataset"].size),
        ("evaluate", "report", "metrics", refs["report.json"].md5, refs["report.json"].size)]
    assert manifest["artifacts"][0]["uri"] == refs["stage1-model"].uri

    # Through the CLI, with the run's artifacts from the lineage store.
    import emu.artifacts.cli as artifacts_cli
    from typer.testing import CliRunner

    from emu.cli import app

    monkeypatch.setattr(artifacts_cli, "run_artifacts", lambda run_id, url=None: artifacts)
    result = CliRunner().invoke(app, ["artifacts", "pull", "run-1", "--out", str(tmp_path / "cli"),
                                      "--remote", str(tmp_path / "remote")])
    assert result.exit_code == 0, result.output
    assert "restored 3 artifacts of run-1" in result.output
    assert read_tree(tmp_path / "cli") == {**{f"stage1/model/{k}": v for k, v in model.items()},
                                           **{f"prepare/dataset/{k}": v for k, v in data.items()},
                                           "evaluate/report/report.json": b'{"vqav2": 0.5}\n',
                                           "manifest.json": (tmp_path / "cli" / "manifest.json").read_bytes()}

    with pytest.raises(ConfigError, match="not an empty folder"):
        pull_run("run-1", out, store, artifacts)
    with pytest.raises(SourceError, match="two artifacts for stage1/model"):
        pull_run("run-1", tmp_path / "dup", store, [artifacts[0], artifacts[0]])


def test_emu_artifacts_pull_restores_a_run_recorded_in_the_lineage_store(tmp_path):
    """End to end with the real lineage store, recorded the way the pipeline tasks record: the
    run's outputs by stage and role, its external input (an init checkpoint of another run) under
    the stage that read it; outputs the run itself read again are not restored twice."""
    from emu.lineage.store import LineageStore

    remote, url = tmp_path / "remote", f"sqlite:///{tmp_path / 'lineage.db'}"
    store = ArtifactStore(str(remote), workdir=tmp_path / "wd")
    trees = {name: make_tree(tmp_path / "outputs" / name, seed=i)
             for i, name in enumerate(("dataset", "model", "init"))}
    (tmp_path / "outputs" / "report.json").write_text('{"cider": 1.5}\n')
    refs = {name: store.push(tmp_path / "outputs" / name) for name in ("dataset", "model", "init", "report.json")}

    lineage = LineageStore(url)
    other = lineage.create_run(status="succeeded")
    run = lineage.create_run(status="running")

    def record(name: str, type_: str) -> int:
        return lineage.record_artifact(refs[name].md5, refs[name].size, str(tmp_path / "outputs" / name), type_)

    init = record("init", "model")
    lineage.link(lineage.start_execution(other.id, "stage1"), init, "out", "model")
    prepare, stage1, evaluate = (lineage.start_execution(run.id, stage) for stage in ("prepare", "stage1", "evaluate"))
    dataset, model, report = record("dataset", "dataset"), record("model", "model"), record("report.json", "report")
    lineage.link(prepare, dataset, "out", "dataset")
    lineage.link(stage1, dataset, "in", "dataset")
    lineage.link(stage1, init, "in", "init")
    lineage.link(stage1, model, "out", "model")
    lineage.link(evaluate, model, "in", "model")
    lineage.link(evaluate, report, "out", "report")
    lineage.close()

    out = tmp_path / "restored"
    # --out as a person types it, relative to the working directory (the summary of `emu run`
    # prints `--out DIR`).
    proc = subprocess.run([str(EMU), "artifacts", "pull", run.id, "--out", "restored", "--remote", str(remote),
                           "--lineage", url], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    expected = {**{f"prepare/dataset/{k}": v for k, v in trees["dataset"].items()},
                **{f"stage1/model/{k}": v for k, v in trees["model"].items()},
                **{f"stage1/init/{k}": v for k, v in trees["init"].items()},
                "evaluate/report/report.json": b'{"cider": 1.5}\n'}
    restored = read_tree(out)
    manifest = json.loads(restored.pop("manifest.json"))
    assert restored == expected
    assert {(a["stage"], a["role"]): (a["md5"], a["type"], a["size"]) for a in manifest["artifacts"]} == {
        ("prepare", "dataset"): (refs["dataset"].md5, "dataset", refs["dataset"].size),
        ("stage1", "model"): (refs["model"].md5, "model", refs["model"].size),
        ("evaluate", "report"): (refs["report.json"].md5, "report", refs["report.json"].size),
        ("stage1", "init"): (refs["init"].md5, "model", refs["init"].size)}
    assert manifest["run_id"] == run.id

    unknown = subprocess.run([str(EMU), "artifacts", "pull", "run-nope", "--out", str(tmp_path / "x"),
                              "--remote", str(remote), "--lineage", url], capture_output=True, text=True,
                             timeout=120)
    assert unknown.returncode == 2 and "run-nope" in unknown.stderr and "Traceback" not in unknown.stderr
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------
# The repository's dvc.yaml


def test_dvc_repro_of_the_repository_pipeline(tmp_path):
    """A copy of the repository (its tracked and new files, as a clone has them), with the synth
    scale lowered through the params file: `dvc repro` builds the shards and dvc.lock, a second
    `dvc repro` does nothing, and `dvc push` fills a remote that ArtifactStore reads by md5."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    copy = tmp_path / "repo"
    for relative in filter(None, listed):
        source = REPO / relative
        if source.is_file():
            (copy / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / relative)
    assert (copy / "dvc.yaml").is_file() and (copy / ".dvc" / "config").is_file()
    subprocess.run(["git", "init", "-q"], cwd=copy, check=True)
    preset = yaml.safe_load((copy / "configs" / "tiny.yaml").read_text())
    preset["synth"]["scale"] = 0.02
    (copy / "configs" / "tiny.yaml").write_text(yaml.safe_dump(preset, sort_keys=False))

    first = dvc("repro", cwd=copy)
    lock = yaml.safe_load((copy / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"synth", "prepare", "validate"}
    assert lock["stages"]["synth"]["params"]["configs/tiny.yaml"]["synth"]["scale"] == 0.02
    shards = next(o for o in lock["stages"]["prepare"]["outs"] if o["path"] == "data/shards")
    sources = json.loads((copy / "data" / "raw" / "sources.json").read_text())
    assert sorted(p.name for p in (copy / "data" / "shards").iterdir() if p.is_dir()) == sorted(
        s["name"] for s in sources)
    assert list((copy / "data" / "shards").rglob("*.tar")), "webdataset shards"
    assert "validation PASSED" in first.stdout
    assert json.loads((copy / "data" / "validation" / "report.json").read_text())["passed"] is True

    second = dvc("repro", cwd=copy)
    for stage in ("synth", "prepare", "validate"):
        assert f"Stage '{stage}' didn't change, skipping" in second.stdout
    assert "Running stage" not in second.stdout
    assert yaml.safe_load((copy / "dvc.lock").read_text()) == lock

    # The dataset md5 in dvc.lock is ArtifactStore's md5; `dvc push` makes it pullable by md5.
    remote = tmp_path / "remote"
    dvc("remote", "modify", "--local", "emu", "url", str(remote), cwd=copy)
    dvc("push", "-q", cwd=copy)
    store = ArtifactStore(str(remote), workdir=tmp_path / "wd")
    assert store.md5(copy / "data" / "shards") == shards["md5"]
    assert store.exists(shards["md5"])
    assert read_tree(store.pull(shards["md5"], tmp_path / "shards")) == read_tree(copy / "data" / "shards")


def test_importing_the_adapter_imports_no_dvc():
    code = ("import sys, emu.artifacts.dvc, emu.artifacts.cli, emu.cli; "
            "assert not any(m.split('.')[0] in ('dvc', 'dvc_data', 'boto3') for m in sys.modules), "
            "sorted(m for m in sys.modules if m.startswith('dvc'))")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
