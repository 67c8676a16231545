"""The pipeline end to end on this machine (kfp.local), on a fast variant of the tiny preset:
a full run, a run served from cache, a stage-2 change re-running stage 2 onward only, lineage
from the final model back to the data shards, a failing stage, and a schedule that fires.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from emu.lineage.store import LineageStore
from emu.pipeline import code_version
from emu.pipeline.runner import RunRequest, compile_pipeline, outcome_of, run_local

ROOT = Path(__file__).resolve().parents[2]
EMU = Path(sys.executable).parent / "emu"
DISTRIBUTED = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def test_committed_pipeline_yaml_is_what_compile_writes(tmp_path):
    """pipelines/emu_pipeline.yaml must be regenerated (`emu compile`) whenever the graph changes."""
    fresh = compile_pipeline("emu2-37b", tmp_path / "emu.yaml")
    assert fresh.read_text() == (ROOT / "pipelines" / "emu_pipeline.yaml").read_text()


def test_compiled_yaml_carries_the_gpu_node_pool_settings():
    spec = yaml.safe_load_all((ROOT / "pipelines" / "emu_pipeline.yaml").read_text())
    docs = list(spec)
    executors = docs[0]["deploymentSpec"]["executors"]
    for stage in ("stage1", "stage2", "decoder", "instruct"):  # precompute's GPUs are the RayCluster's
        resources = executors[f"exec-{stage}"]["container"]["resources"]
        assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
        assert resources["accelerator"]["resourceCount"] == "8"
    kubernetes = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for stage in ("stage1", "stage2"):
        config = kubernetes[f"exec-{stage}"]
        assert config["nodeSelector"]["labels"] == {"emu.platform/pool": "gpu-h100"}
        assert config["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert config["emptyDirMounts"][0]["mountPath"] == "/dev/shm"
        assert config["emptyDirMounts"][0]["medium"] == "Memory"
        assert config["secretAsEnv"][0]["secretName"] == "emu-s3"
    assert "accelerator" not in executors["exec-validate"]["container"].get("resources", {})


def test_compiled_yaml_ends_the_run_in_an_exit_handler():
    """On a cluster nothing but the run itself can end its lineage record (emu.pipeline.tasks.finish_task)."""
    root = yaml.safe_load_all((ROOT / "pipelines" / "emu_pipeline.yaml").read_text()).__next__()["root"]["dag"]
    finish = root["tasks"]["finish"]
    assert finish["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert finish["inputs"]["parameters"]["status"]["taskFinalStatus"]["producerTask"] == "exit-handler-1"
    assert set(root["tasks"]) == {"exit-handler-1", "finish"}, "every task runs inside the handler"
    assert not finish["cachingOptions"].get("enableCache"), "a cached finish would end nothing"
    inner = next(yaml.safe_load_all((ROOT / "pipelines" / "emu_pipeline.yaml").read_text()))["components"]
    prepare = inner["comp-exit-handler-1"]["dag"]["tasks"]["prepare"]
    assert not prepare["cachingOptions"].get("enableCache"), "a UI run's folder source is read when it runs"
    assert inner["comp-exit-handler-1"]["dag"]["tasks"]["stage1"]["cachingOptions"]["enableCache"]


def fast_preset(folder: Path) -> Path:
    """The tiny preset with a smaller world and a few steps per stage: the same code paths."""
    preset = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    preset["synth"]["scale"] = 0.1
    for count in ("pairs", "chats", "vqa_train_images", "vqa_images"):  # the defaults: a smaller world
        preset["synth"].pop(count, None)
    for stage in ("stage1", "stage2", "decoder", "instruct", "instruct_gen"):
        preset[stage]["steps"] = 3
        preset[stage]["runtime"]["progress"] = False
    preset["decoder"]["vae_steps"] = 3
    preset["evaluate"] = {"benches": ["vqav2", "coco-captions", "autoencode"], "max_new_tokens": 3,
                          "caption_tokens": 8, "inference_steps": 2}
    path = folder / "fast.yaml"
    path.write_text(yaml.safe_dump(preset))
    return path


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A fresh EMU_HOME (lineage DB, DVC remote, KFP root and cache) for this module's runs."""
    root = tmp_path_factory.mktemp("emu-home")
    saved = {k: os.environ.get(k) for k in ("EMU_HOME", "EMU_LINEAGE_URL", "EMU_DVC_REMOTE", "EMU_RUN_ID")}
    os.environ["EMU_HOME"] = str(root)
    for name in ("EMU_LINEAGE_URL", "EMU_DVC_REMOTE", "EMU_RUN_ID"):
        os.environ.pop(name, None)
    yield root
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def first_console(home):
    """The first run, as a person starts it: `emu run` in a shell (its output captured)."""
    preset = fast_preset(home)
    proc = subprocess.run([str(EMU), "run", "--preset", str(preset)], capture_output=True, text=True,
                          env=_env(home), cwd=home, timeout=1500)
    return preset, proc


@pytest.fixture(scope="module")
def first(first_console):
    preset, proc = first_console
    run_id = re.search(r"^run (\S+): SUCCEEDED", proc.stdout, re.M)
    assert proc.returncode == 0 and run_id, proc.stdout + proc.stderr
    return preset, outcome_of(LineageStore(), run_id.group(1))


def test_first_run_prints_a_short_console_and_logs_everything(first_console, first):
    """At default verbosity a line per stage start and end, the training stages' progress and
    the summary (kfp.local alone printed ~1,300 lines); every line of every task is in the run's
    log file, without colour codes."""
    _, proc = first_console
    _, outcome = first
    shown = proc.stdout.splitlines() + proc.stderr.splitlines()
    assert len(shown) <= 60, "\n".join(shown)
    assert "\x1b" not in proc.stdout + proc.stderr
    for stage in ("prepare", "validate", "stage1", "precompute", "stage2", "decoder", "instruct", "evaluate"):
        assert re.search(rf"^\S+  {stage} +started$", proc.stdout, re.M), stage
        assert re.search(rf"^\S+  {stage} +succeeded in ", proc.stdout, re.M), stage
    for stage in ("stage1", "stage2", "decoder", "instruct"):  # 3 steps: reports at 1/3 and 2/3
        assert re.search(rf"^\S+  {stage} +step 1/3 loss \S+ .*ETA", proc.stdout, re.M), stage
    assert re.search(r"^\S+  stage1 +succeeded in \d+ s \(step 3/3 loss ", proc.stdout, re.M)
    assert f"log: {outcome.log_path}" in proc.stdout
    logged = outcome.log_path.read_text(encoding="utf-8")
    assert len(logged.splitlines()) > 10 * len(shown)
    for expected in ("Executing task 'stage1'", '"parameterValues"', "stage1 step 3/3 loss", "imported ",
                     "Task 'evaluate' finished with status SUCCESS", f"run {outcome.run_id}: SUCCEEDED"):
        assert expected in logged, expected
    assert "\x1b" not in logged


def test_printed_commands_work_in_a_new_shell(first_console, first, home):
    """The summary's commands, pasted as printed into a fresh shell (no EMU_HOME, no venv on
    PATH) in the directory the run was started from, find the run."""
    _, proc = first_console
    _, outcome = first
    lineage = re.search(r"^lineage: (.+)$", proc.stdout, re.M).group(1)
    pull = re.search(r"restore anywhere: (.+)\)$", proc.stdout, re.M).group(1).replace("DIR", "restored")
    fresh = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root")}
    shown = subprocess.run(["bash", "-c", lineage], capture_output=True, text=True, env=fresh, cwd=home, timeout=300)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"run {outcome.run_id}") and "data shards (" in shown.stdout
    pulled = subprocess.run(["bash", "-c", pull], capture_output=True, text=True, env=fresh, cwd=home, timeout=300)
    assert pulled.returncode == 0, pulled.stderr
    assert (home / "restored").is_dir() and any((home / "restored").iterdir())


def stages(outcome, cached: bool) -> list[str]:
    return [t["stage"] for t in outcome.tasks if t["cached"] == cached]


def test_first_run_executes_every_stage_and_records_lineage(first):
    preset, outcome = first
    assert outcome.status == "succeeded", outcome.error
    assert stages(outcome, cached=False) == ["prepare", "validate", "stage1", "precompute", "stage2", "decoder",
                                             "instruct", "evaluate"]
    assert {"vqav2_accuracy", "vqav2_chance", "coco_captions_cider"} <= set(outcome.evaluation)


def test_lineage_of_the_final_model_reaches_the_data_shards(first, home):
    _, outcome = first
    store = LineageStore()
    executions = {e.stage: e for e in store.list_executions(outcome.run_id)}
    proc = subprocess.run([str(EMU), "lineage", "show", outcome.run_id, "--format", "json"], capture_output=True,
                          text=True, env=_env(home), timeout=120)
    assert proc.returncode == 0, proc.stderr
    graph = json.loads(proc.stdout)
    instruct_out = [e for e in graph["edges"] if e["execution_id"] == executions["instruct"].id and e["direction"] == "out"]
    model = next(a for a in graph["artifacts"] if a["id"] == instruct_out[0]["artifact_id"])
    up = json.loads(subprocess.run([str(EMU), "lineage", "show", model["md5"], "--format", "json"],
                                   capture_output=True, text=True, env=_env(home), timeout=120).stdout)
    stages_up = {e["stage"] for e in up["executions"]}
    assert {"prepare", "stage1", "precompute", "stage2", "instruct"} <= stages_up
    datasets = {a["md5"]: a for a in up["artifacts"] if a["type"] == "dataset"}
    folders = [md5 for md5 in datasets if md5.endswith(".dir")]
    assert len(folders) == 1, "the prepared dataset folder"
    # ... and the exact shards the training stages read, by their DVC md5 (the md5 of the bytes).
    import hashlib

    shards = {md5: Path(a["uri"]) for md5, a in datasets.items() if not md5.endswith(".dir")}
    assert shards, "lineage names the shards"
    for md5, path in shards.items():
        assert hashlib.md5(path.read_bytes()).hexdigest() == md5
    trained_on = {p.parent.name for p in shards.values()}
    assert {"img2dataset", "llava-chat", "vqav2-train"} <= trained_on
    assert not trained_on & {"vqav2", "coco"}, "evaluation sets are held out of training"
    run = up["runs"][0]
    assert run["git_commit"] and run["parameters"]["configs"]["stage2"]["steps"] == 3
    assert all(e["config"] for e in up["executions"] if e["stage"] in ("stage1", "stage2", "instruct"))


def test_unchanged_rerun_is_served_from_cache(first):
    """Except the gate's tasks once the first run promoted its model: evaluate and register take
    the production model as an input, so they run again against it, and then are cached too."""
    preset, _ = first
    promoted = LineageStore().production() is not None
    after_promotion = run_local(RunRequest(preset=str(preset)))
    assert after_promotion.status == "succeeded"
    assert stages(after_promotion, cached=False) == (["evaluate", "register"] if promoted else [])
    again = run_local(RunRequest(preset=str(preset)))
    assert again.status == "succeeded"
    assert stages(again, cached=False) == [], "every stage reused"
    assert set(stages(again, cached=True)) >= {"prepare", "stage1", "stage2", "instruct", "evaluate"}
    assert all(t["seconds"] == 0 for t in again.tasks)
    assert again.evaluation == first[1].evaluation


def test_a_cluster_run_records_its_cached_tasks_as_kfp_local_does(first):
    """On a cluster a cached task runs nothing; the exit handler finds the execution it reused from
    the pipeline's arguments and the tasks' recorded calls (emu.pipeline.cached_lineage). The
    same arguments must find exactly the originals kfp.local's cache entries name."""
    from emu.pipeline.cached_lineage import compiled_wiring, record_reused
    from emu.pipeline.runner import parameters

    preset, _ = first
    request = RunRequest(preset=str(preset))
    local_run = run_local(request)
    assert local_run.status == "succeeded" and stages(local_run, cached=False) == []
    store = LineageStore()
    local = {e.stage: e.cached_from for e in store.list_executions(local_run.run_id)}
    # Recorded as a cluster run's is before the exit handler runs: nothing but the run itself (on
    # the local backend, whose executions it reused).
    cluster_run = store.create_run(trigger="schedule", kfp_run_id="kfp-cached", status="running")
    recorded = record_reused(store, cluster_run.id, parameters(request), compiled_wiring(), run_succeeded=True)
    assert sorted(recorded) == sorted(local), "the same tasks are found cached"
    found = {e.stage: e.cached_from for e in store.list_executions(cluster_run.id) if e.cached}
    # kfp.local's entry names no original for a task without output artifacts (register).
    assert {s: o for s, o in found.items() if local[s] is not None} == {s: o for s, o in local.items() if o}
    assert all(store.get_execution(o).stage == s and not store.get_execution(o).cached for s, o in found.items())


def test_a_run_on_the_dataset_md5_copies_nothing_and_reuses_every_later_stage(first, home):
    """--data MD5 names content the remote holds: prepare checks it and hands it on (no copy),
    and every task after it caches on that md5, the one the synthetic world's run made."""
    preset, outcome = first
    store = LineageStore()
    [made] = [a.md5 for e in store.list_executions(outcome.run_id) if e.stage == "prepare"
              for a in store.output_artifacts(e.cached_from or e.id) if a.type == "dataset"]
    by_md5 = run_local(RunRequest(preset=str(preset), source=made))
    assert by_md5.status == "succeeded", by_md5.error
    assert stages(by_md5, cached=False) == ["prepare"]
    [prepare] = [e for e in store.list_executions(by_md5.run_id) if e.stage == "prepare"]
    [handed] = store.output_artifacts(prepare.id)
    assert handed.md5 == made
    assert any(uri.startswith(str(home / "dvc-remote")) for uri in store.artifact_uris(handed.id)), \
        "the dataset is pointed at in the remote"
    copies = [p for p in (home / "kfp").rglob("dataset.d") if p.stat().st_mtime >= prepare.started_at.timestamp()]
    assert copies == [], "prepare copied the dataset"


def test_changed_stage2_setting_reruns_stage2_onward_only(first):
    preset, _ = first
    changed = run_local(RunRequest(preset=str(preset), overrides=["stage2.lr=2e-3"]))
    assert changed.status == "succeeded"
    assert set(stages(changed, cached=False)) == {"stage2", "instruct", "evaluate"}
    assert set(stages(changed, cached=True)) >= {"prepare", "validate", "stage1", "precompute", "decoder"}


def code_copy(folder: Path, edited: str) -> Path:
    """A copy of the sources a code version reads, with `edited` (a path under it) changed."""
    for top in ("emu", "components", "configs"):
        shutil.copytree(ROOT / top, folder / top, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", folder / "pyproject.toml")
    path = folder / edited
    path.write_text(path.read_text(encoding="utf-8") + "\n# an edit\n", encoding="utf-8")
    return folder


def test_a_dashboard_only_code_change_reruns_no_stage(first, tmp_path, monkeypatch):
    """Each task's cache key holds its own stage's code version (emu.pipeline.code_version)."""
    preset, _ = first
    monkeypatch.setattr(code_version, "ROOT", code_copy(tmp_path, "emu/dashboard/views.py"))
    again = run_local(RunRequest(preset=str(preset)))
    assert again.status == "succeeded"
    assert stages(again, cached=False) == [], "a dashboard edit re-runs nothing"


def test_a_change_under_emu_train_reruns_the_training_stages(first, tmp_path, monkeypatch):
    preset, _ = first
    monkeypatch.setattr(code_version, "ROOT", code_copy(tmp_path, "emu/train/stages.py"))
    again = run_local(RunRequest(preset=str(preset)))
    assert again.status == "succeeded"
    assert {"stage1", "stage2", "decoder", "instruct"} <= set(stages(again, cached=False))
    assert {"prepare", "validate"} <= set(stages(again, cached=True)), "data stages run no training code"


def test_a_failing_stage_stops_its_dependants_and_the_next_run_resumes(first, home):
    preset, _ = first
    # A context too short for a 16-token image fails instruction tuning before its first step.
    failed = run_local(RunRequest(preset=str(preset), overrides=["instruct.sequence.max_len=12"]))
    assert failed.status == "failed"
    by_stage = {t["stage"]: t for t in failed.tasks}
    assert by_stage["instruct"]["status"] == "failed" and "sequence.max_len=12" in by_stage["instruct"]["error"]
    assert "evaluate" not in by_stage, "evaluate depends on instruct and must not run"
    assert all(by_stage[s]["cached"] for s in ("prepare", "stage1", "stage2")), "completed artifacts stay"
    run = LineageStore().get_run(failed.run_id)
    assert run.status == "failed" and "instruct" in run.error
    fixed = run_local(RunRequest(preset=str(preset), overrides=["instruct.sequence.max_len=2048"]))
    assert fixed.status == "succeeded"
    assert set(stages(fixed, cached=False)) == {"instruct", "evaluate"}, "resumes from the failed stage"


def test_schedule_fires_and_its_run_is_recorded_with_the_schedule(first, home):
    preset, _ = first
    env = _env(home)
    create = subprocess.run([str(EMU), "schedule", "create", "--cron", "* * * * * *", "--name", "every-second",
                             "--preset", str(preset)], capture_output=True, text=True, env=env, timeout=120)
    assert create.returncode == 0, create.stderr
    import time

    time.sleep(1.5)
    digest = "sha256:" + "ab" * 32  # the image the scheduler runs in: its runs record it
    fire = subprocess.run([str(EMU), "scheduler", "--once"], capture_output=True, text=True,
                          env={**env, "EMU_IMAGE_DIGEST": digest}, timeout=120)
    assert fire.returncode == 0 and "started run" in fire.stdout, fire.stdout + fire.stderr
    run_id = fire.stdout.split("started run ")[1].split()[0]
    store = LineageStore()
    deadline = time.monotonic() + 300
    while store.get_run(run_id).status in ("pending", "running") and time.monotonic() < deadline:
        time.sleep(1)
    run = store.get_run(run_id)
    schedule = store.get_schedule("every-second")
    assert run.trigger == "schedule" and run.schedule_id == schedule.id and run.status == "succeeded"
    assert run.image_digest == digest
    assert schedule.last_run_id == run_id
    delete = subprocess.run([str(EMU), "schedule", "delete", "every-second"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert delete.returncode == 0 and store.get_schedule("every-second") is None


def dvc_project(folder: Path, remote: Path, env: dict[str, str]) -> Path:
    """A DVC project (no git) whose default remote is `remote`."""
    folder.mkdir()
    for args in (["init", "--no-scm", "-q"], ["remote", "add", "-d", "shared", str(remote)]):
        done = subprocess.run([str(EMU.parent / "dvc"), *args], cwd=folder, capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
    return folder


def gc(project: Path, env: dict[str, str]) -> None:
    done = subprocess.run([str(EMU.parent / "dvc"), "gc", "-w", "-c", "-f"], cwd=project, capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dvc_gc_on_the_shared_remote_keeps_what_emu_artifacts_keep_recorded(first, home, tmp_path):
    """Pipeline outputs are pushed to the remote, not tracked by a DVC project: `dvc gc -w -c`
    deletes them unless `emu artifacts keep` gave them .dvc records in the project."""
    _, outcome = first
    env = _env(home)
    remote = home / "dvc-remote"
    # Without records (on a copy of the remote): gc deletes the run's artifacts.
    copy = tmp_path / "remote-copy"
    shutil.copytree(remote, copy)
    gc(dvc_project(tmp_path / "bare", copy, env), env)
    # Pulls on a fresh machine (no DVC fetch cache), from the run id and the lineage store alone.
    fresh = {**env, "EMU_HOME": str(tmp_path / "fresh"), "EMU_LINEAGE_URL": f"sqlite:///{home / 'lineage.db'}"}
    lost = subprocess.run([str(EMU), "artifacts", "pull", outcome.run_id, "--out", str(tmp_path / "lost"),
                           "--remote", str(copy)], capture_output=True, text=True, env=fresh, timeout=600)
    assert lost.returncode != 0, lost.stdout

    project = dvc_project(tmp_path / "project", remote, env)
    kept = subprocess.run([str(EMU), "artifacts", "keep", "--out", str(project / "artifacts")], capture_output=True,
                          text=True, env=env, timeout=300)
    assert kept.returncode == 0 and "kept " in kept.stdout, kept.stdout + kept.stderr
    record = yaml.safe_load((project / "artifacts" / outcome.run_id / "instruct-model.dvc").read_text())
    assert record["outs"][0]["md5"].endswith(".dir") and record["outs"][0]["hash"] == "md5"
    gc(project, env)
    restored = subprocess.run([str(EMU), "artifacts", "pull", outcome.run_id, "--out", str(tmp_path / "restored"),
                               "--remote", str(remote)], capture_output=True, text=True, env=fresh, timeout=600)
    assert restored.returncode == 0, restored.stdout + restored.stderr
    manifest = json.loads((tmp_path / "restored" / "manifest.json").read_text())
    assert {a["stage"] for a in manifest["artifacts"]} >= {"prepare", "stage1", "stage2", "decoder", "instruct"}


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED and k != "EMU_RUN_ID"}
    env["EMU_HOME"] = str(home)
    return env
