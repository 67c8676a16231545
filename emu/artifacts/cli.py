"""`emu artifacts ...`: content-addressed artifacts in the DVC remote (emu.artifacts.dvc).

    emu artifacts pull RUN_ID --out DIR     every artifact of a run, as DIR/<stage>/<role>/ + manifest.json
    emu artifacts get MD5 --out DIR         one artifact by its DVC md5
    emu artifacts push PATH                 content-address a file or folder; prints md5, size, uri
    emu artifacts md5 PATH                  DVC's md5 of a file or folder (what `dvc add` records)
    emu artifacts exists MD5                exit 0 when the remote holds it, 1 when not
    emu artifacts keep [RUN_ID...] --out DIR   .dvc records of runs' outputs, so `dvc gc` keeps them

The remote is `--remote`, else $EMU_DVC_REMOTE, else `$EMU_HOME/dvc-remote`; S3 remotes
take their endpoint and credentials from the AWS_* variables. Registered in emu/cli.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Mapping
from typing import Annotated, Any, Optional

import typer

artifacts_app = typer.Typer(
    help="Content-addressed artifacts in the DVC remote: restore a run, get/push/hash one artifact.",
    no_args_is_help=True)

RemoteOption = Annotated[Optional[str], typer.Option(
    "--remote", help="DVC remote: a folder or s3://bucket/prefix (default: $EMU_DVC_REMOTE, else "
                     "$EMU_HOME/dvc-remote).")]


def _store(remote: str | None):
    from emu.artifacts.dvc import ArtifactStore

    return ArtifactStore(remote)


def run_artifacts(run_id: str, lineage_url: str | None = None) -> list[dict[str, Any]]:
    """The artifacts of a run, from the lineage store (its run graph, emu.lineage.query)."""
    from emu.lineage.query import run_graph
    from emu.lineage.store import LineageStore

    store = LineageStore(lineage_url)
    try:
        return artifacts_of_run(run_graph(store, run_id).to_dict())
    finally:
        store.close()


def artifacts_of_run(graph: Mapping[str, Any]) -> list[dict[str, Any]]:
    """What `pull_run` restores from a run graph (the JSON form of emu.lineage.query.LineageGraph):
    every artifact an execution of the run wrote, as `<stage>/<role>` (a stage that ran twice in
    the run, e.g. retried, gives its last execution's), then every artifact the run read that none
    of its executions wrote (the source data, an init checkpoint of another run), as
    `<stage>/<role>` of its first reader. An empty role falls back to the artifact's name, then
    its type."""
    executions = graph.get("executions", [])
    order = {e["id"]: i for i, e in enumerate(executions)}  # the graph lists them by start time
    stages = {e["id"]: e["stage"] for e in executions}
    artifacts = {a["id"]: a for a in graph.get("artifacts", [])}
    edges = sorted((e for e in graph.get("edges", [])
                    if e["execution_id"] in stages and e["artifact_id"] in artifacts),
                   key=lambda e: order[e["execution_id"]])
    chosen: dict[tuple[str, str], dict[str, Any]] = {}
    for direction in ("out", "in"):
        for edge in (e for e in edges if e["direction"] == direction):
            artifact = artifacts[edge["artifact_id"]]
            key = (stages[edge["execution_id"]], edge.get("role") or artifact.get("name") or artifact["type"])
            if direction == "in" and (key in chosen or any(
                    item["id"] == artifact["id"] for item in chosen.values())):
                continue  # written by the run itself, or already restored for an earlier reader
            chosen[key] = {"stage": key[0], "role": key[1], "id": artifact["id"], "md5": artifact["md5"],
                           "type": artifact["type"], "size": artifact.get("size"), "uri": artifact.get("uri")}
    return list(chosen.values())


@artifacts_app.command("pull")
def pull(
    run_id: Annotated[str, typer.Argument(help="Run id (as `emu lineage` lists it).")],
    out: Annotated[Path, typer.Option(help="Empty or new folder: OUT/<stage>/<role>/ and OUT/manifest.json.")],
    remote: RemoteOption = None,
    lineage: Annotated[Optional[str], typer.Option(
        help="Lineage database URL (default: $EMU_LINEAGE_URL, else $EMU_HOME/lineage.db).")] = None,
) -> None:
    """Restore every artifact of a run, bit for bit, from the DVC remote (works on a fresh machine)."""
    from emu.artifacts.dvc import pull_run

    pulled = pull_run(run_id, out, _store(remote), run_artifacts(run_id, lineage))
    for item in pulled:
        typer.echo(f"{item.stage}/{item.role}: {item.md5} ({item.size} bytes) -> {out / item.path}")
    typer.echo(f"restored {len(pulled)} artifacts of {run_id} into {out} (manifest.json lists them)")


@artifacts_app.command("get")
def get(
    md5: Annotated[str, typer.Argument(help="DVC md5 (32 hex digits, '.dir' for a folder).")],
    out: Annotated[Path, typer.Option(help="Empty or new folder to restore into.")],
    name: Annotated[Optional[str], typer.Option(help="File name for a file artifact (default: the md5).")] = None,
    remote: RemoteOption = None,
) -> None:
    """Restore one artifact by its md5: a folder artifact fills OUT, a file lands in OUT/NAME."""
    typer.echo(str(_store(remote).pull(md5, out, filename=name)))


@artifacts_app.command("push")
def push(path: Annotated[Path, typer.Argument(help="File or folder.")], remote: RemoteOption = None) -> None:
    """Content-address a file or folder into the remote (uploads only what it lacks); prints its ref as JSON."""
    typer.echo(json.dumps(_store(remote).push(path).to_json()))


@artifacts_app.command("md5")
def md5(path: Annotated[Path, typer.Argument(help="File or folder.")]) -> None:
    """DVC's md5 of a file or folder: the value `dvc add` records, the same on any machine and path."""
    typer.echo(_store(None).md5(path))


@artifacts_app.command("exists")
def exists(md5: Annotated[str, typer.Argument(help="DVC md5.")], remote: RemoteOption = None) -> None:
    """Exit 0 when the remote holds every object of MD5, 1 when it does not."""
    found = _store(remote).exists(md5)
    typer.echo("present" if found else "absent")
    raise typer.Exit(0 if found else 1)


@artifacts_app.command("keep")
def keep(
    run_ids: Annotated[Optional[list[str]], typer.Argument(
        help="Runs to keep (default: every run in the lineage store).")] = None,
    out: Annotated[Path, typer.Option(
        help="Folder inside the DVC project (commit it): OUT/<run_id>/<stage>-<role>.dvc.")] = Path("artifacts"),
    lineage: Annotated[Optional[str], typer.Option(
        help="Lineage database URL (default: $EMU_LINEAGE_URL, else $EMU_HOME/lineage.db).")] = None,
) -> None:
    """Write a .dvc record for every output of the runs, so that `dvc gc -w -c` on the shared
    remote keeps them (pipeline outputs are known to the lineage store, not to DVC): run it in the
    DVC project before each gc, or commit OUT (emu.artifacts.records)."""
    from emu.artifacts.records import write_records
    from emu.lineage.store import LineageStore

    if not run_ids:
        store = LineageStore(lineage)
        try:
            run_ids = [run.id for run in store.list_runs(limit=None)]
        finally:
            store.close()
    total, runs = 0, 0
    for run_id in run_ids:
        artifacts = [a for a in run_artifacts(run_id, lineage) if a.get("md5")]
        if not artifacts:
            continue  # a run that failed before writing anything
        total += len(write_records(run_id, artifacts, out))
        runs += 1
    typer.echo(f"kept {total} artifacts of {runs} runs: .dvc records in {out}")
