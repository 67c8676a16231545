"""The lineage store on a real PostgreSQL server: same records, same walks as on SQLite.

A throwaway server is started with `initdb` + `pg_ctl` in a temporary folder on a free loopback
port (as the `postgres` user when the tests run as root: the server refuses root). Skipped, with
the reason, when the server binaries or the psycopg driver are missing: psycopg is not a platform
dependency (the store needs it only for postgresql+psycopg:// URLs); install it with
`pip install 'psycopg[binary]'` to run these.
"""

from __future__ import annotations

import glob
import multiprocessing
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest

from emu.lineage.query import downstream, show
from emu.lineage.store import LineageStore
from tests.unit.test_lineage import _write_concurrently, build_world

psycopg = pytest.importorskip("psycopg", reason="psycopg not installed (pip install 'psycopg[binary]')")


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def pg_server():
    """URL prefix `postgresql+psycopg://emu@127.0.0.1:PORT/` of a running throwaway server."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found")
    run_as: dict = {}
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    root = Path(tempfile.mkdtemp(prefix="emu-pg-"))
    if run_as:
        os.chown(root, run_as["user"], run_as["group"])
    data, port = root / "data", _free_port()
    env = {**os.environ, "LC_ALL": "C"}

    def pg(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, capture_output=True, text=True, timeout=120, env=env, cwd=root, **run_as)

    proc = pg(initdb, "-D", str(data), "-A", "trust", "-U", "emu", "-E", "UTF8", "--no-sync")
    if proc.returncode:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"initdb failed: {proc.stderr.strip()[-300:]}")
    options = f"-p {port} -c listen_addresses=127.0.0.1 -k {root} -c fsync=off -c full_page_writes=off"
    proc = pg(pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "server.log"), "-w", "-t", "60", "start")
    if proc.returncode:
        log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"pg_ctl start failed: {proc.stderr.strip()[-300:]} {log[-300:]}")
    try:
        yield f"postgresql+psycopg://emu@127.0.0.1:{port}/"
    finally:
        pg(pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture()
def pg_url(pg_server):
    """A fresh, empty database on the server."""
    name = f"lineage_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server.replace("postgresql+psycopg", "postgresql") + "postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return pg_server + name


def _portable(graph) -> dict:
    """A graph with database-assigned ids and record times replaced by md5s / stage names (schedule
    ids are random: only their presence is compared)."""
    md5_of = {a["id"]: a["md5"] + "/" + a["type"] for a in graph.artifacts}
    stage_of = {x["id"]: f"{x['run_id']}/{x['stage']}" for x in graph.executions}
    return {
        "runs": [{**r, "schedule_id": r["schedule_id"] is not None} for r in graph.runs],
        "executions": [{**x, "id": stage_of[x["id"]]} for x in graph.executions],
        "artifacts": sorted(({**a, "id": md5_of[a["id"]], "created_at": None} for a in graph.artifacts),
                            key=lambda a: a["id"]),
        "edges": sorted((stage_of[e["execution_id"]], md5_of[e["artifact_id"]], e["direction"], e["role"])
                        for e in graph.edges),
        "metrics": [{**m, "execution_id": stage_of.get(m["execution_id"]), "recorded_at": None}
                    for m in graph.metrics],
    }


def test_postgres_and_sqlite_record_and_walk_the_same_lineage(pg_url, tmp_path):
    root = tmp_path / "lake"
    pg = build_world(pg_url, root)
    lite = build_world(f"sqlite:///{tmp_path / 'lineage.db'}", root)
    assert pg.store.engine.dialect.name == "postgresql"
    for target in (str(root / "model-chat"), pg.md5["model-chat"], pg.run):
        assert _portable(show(pg.store, target)) == _portable(show(lite.store, target)), target
    pg_down = downstream(pg.store, pg.art["shards-llava"])
    assert _portable(pg_down) == _portable(downstream(lite.store, lite.art["shards-llava"]))
    assert {m["name"] for m in pg_down.metrics} == {"vqav2_accuracy", "coco_cider"}
    # timestamptz comes back aware UTC, JSON (JSONB) round-trips.
    run = pg.store.get_run(pg.run)
    assert run.created_at == datetime(2025, 1, 10, 2, 0, tzinfo=timezone.utc)
    assert run.parameters == {"steps_scale": 1, "bench": ["vqav2"]}
    assert [r.id for r in pg.store.list_runs(trigger="schedule")] == [pg.rerun]


def test_postgres_schedules_and_audit(pg_url):
    store = LineageStore(pg_url)
    now = datetime(2025, 3, 1, 10, 7, tzinfo=timezone.utc)
    sched = store.create_schedule("pg-nightly", "0 0 2 * * *", {"x": 1}, "alice", now=now)
    assert store.due_schedules(datetime(2025, 3, 2, 2, 0, tzinfo=timezone.utc))[0].id == sched.id
    assert store.mark_schedule_fired(sched.id, None, expected_next_run_at=sched.next_run_at, now=now)
    assert not store.mark_schedule_fired(sched.id, None, expected_next_run_at=sched.next_run_at, now=now)
    store.audit("alice", "schedule.create", sched.id, {"cron": "0 0 2 * * *"})
    assert store.audit_entries(user="alice")[0].request == {"cron": "0 0 2 * * *"}
    store.delete_schedule("pg-nightly")
    assert store.list_schedules() == []


def test_postgres_concurrent_writers_share_artifacts(pg_url):
    """Processes racing to record the same (md5, type) end with one row each (the retry path)."""
    workers, n = 3, 15
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(workers)
    procs = [ctx.Process(target=_write_concurrently, args=(pg_url, w, n, barrier)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * workers
    store = LineageStore(pg_url)
    assert len(store.list_runs(status="succeeded")) == workers
    with store.session() as s:
        from sqlalchemy import func, select

        from emu.lineage.models import Artifact, Edge
        assert s.scalar(select(func.count()).select_from(Artifact).where(Artifact.type == "dataset")) == n
        assert s.scalar(select(func.count()).select_from(Edge)) == 2 * workers * n
