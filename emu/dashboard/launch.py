"""Retraining from the dashboard: check a request, then start a pipeline run on the configured
backend, recorded in the lineage store with the dashboard user as its trigger.

- `local`: the run is recorded (pending) first, then `emu run` starts in its own process (as
  `emu scheduler` starts runs); a watcher thread marks the run failed, with the end of its log,
  if that process dies before the run could record its own outcome.
- `kfp`: the compiled pipeline is submitted to the cluster (emu.pipeline.runner.submit).

Requests are checked before anything starts: the preset must be one the dashboard offers (a user
cannot point it at an arbitrary file), and every override must be `section.key=value` with a
known key and a value of the key's type (ConfigError naming the key otherwise).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from emu.config import preset_path
from emu.dashboard.config import DashboardConfig
from emu.errors import ConfigError, EmuError
from emu.lineage.store import LineageStore
from emu.pipeline.console import strip_ansi
from emu.pipeline.runner import ROOT, RunRequest, launch_background, parameters, run_log_path, submit
from emu.pipeline.tasks import KFP_STATES

log = logging.getLogger(__name__)

__all__ = ["RetrainRequest", "Launcher", "offered_presets", "parse_overrides"]

_MD5 = re.compile(r"[0-9a-f]{32}(\.dir)?")
#: Seconds between two reads of one cluster run's state.
KFP_POLL_S = 10.0


@dataclass
class RetrainRequest:
    preset: str = "tiny"
    #: Training data: a shard folder, an s3:// URI or a DVC md5; "" = the synthetic shapes world.
    data: str = ""
    overrides: list[str] = field(default_factory=list)


def offered_presets(config: DashboardConfig) -> dict[str, str]:
    """Preset name -> what `emu run --preset` gets: the shipped presets and the configured extras."""
    offered = {path.stem: path.stem for path in sorted((ROOT / "configs").glob("*.yaml"))}
    for extra in config.presets:
        offered[Path(extra).stem] = str(Path(extra).resolve())
    return offered


def parse_overrides(text: str) -> list[str]:
    """One `section.key=value` per line (blank lines and `#` comments ignored)."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


class Launcher:
    """Starts retrains for the dashboard (one per app)."""

    def __init__(self, config: DashboardConfig, store: LineageStore) -> None:
        self.config, self.store = config, store
        # submit() compiles to one file ($EMU_HOME/emu_pipeline.yaml): two submissions at once
        # could each upload the other's compiled resources.
        self._submit_lock = threading.Lock()
        self._kfp_client = None
        self._polled: dict[str, float] = {}

    def check(self, request: RetrainRequest) -> RunRequest:
        """The run `request` asks for, or ConfigError saying what is wrong with it."""
        presets = offered_presets(self.config)
        if request.preset not in presets:
            raise ConfigError(f"preset {request.preset!r} is not offered; choose one of {', '.join(presets)}")
        data = request.data.strip()
        if data and not (data.startswith("s3://") or _MD5.fullmatch(data) or Path(data).is_dir()):
            raise ConfigError(f"data {data!r} is neither a shard folder on this machine, an s3:// URI nor a DVC md5")
        if data and not (data.startswith("s3://") or _MD5.fullmatch(data)):
            data = str(self._inside_data_roots(data))
        run = RunRequest(preset=presets[request.preset], source=data, overrides=list(request.overrides),
                         trigger="dashboard", host=self.config.kfp_host if self.config.backend == "kfp" else "")
        preset_path(run.preset)  # exists
        parameters(run)          # every override: known section and key, value of the right type
        return run

    def _inside_data_roots(self, data: str) -> Path:
        """The folder, resolved (symlinks and `..` followed), if it lies in one of the configured
        data roots: a dashboard user must not make the server train on any folder it can read."""
        folder = Path(data).resolve()
        roots = [Path(root).expanduser().resolve() for root in self.config.data_roots]
        if not any(folder == root or root in folder.parents for root in roots):
            allowed = ", ".join(str(r) for r in roots) or "none configured (dashboard.data_roots)"
            raise ConfigError(f"data {data!r} is outside the dashboard's data roots ({allowed})")
        return folder

    def start(self, request: RetrainRequest, user: str) -> str:
        """Start the run; returns its lineage run id."""
        run = self.check(request)
        run.triggered_by = user
        if self.config.backend == "kfp":
            with self._submit_lock:
                kfp_run_id = submit(run)
            recorded = self.store.get_run_by_kfp_id(kfp_run_id)
            if recorded is None:
                raise ConfigError(f"KFP run {kfp_run_id} was submitted but not recorded in the lineage store")
            return recorded.id
        recorded = self.store.create_run(trigger="dashboard", triggered_by=user, preset=run.preset, status="pending",
                                         parameters={"source": run.source, "overrides": list(run.overrides)})
        try:
            process = launch_background(recorded.id, run.preset, run.source, run.overrides, store=self.store)
        except Exception as exc:  # never leave a run pending that nothing will start
            self.store.update_run(recorded.id, status="failed", error=f"could not start `emu run`: {exc}")
            raise
        threading.Thread(target=self._watch, args=(recorded.id, process), daemon=True,
                         name=f"watch-{recorded.id}").start()
        return recorded.id

    def _watch(self, run_id: str, process) -> None:
        """Wait for `emu run`; a run it left pending or running never recorded its outcome (it died,
        or wrote to another lineage store than the dashboard's): mark it failed, with its log's end."""
        code = process.wait()
        run = self.store.get_run(run_id)
        if run is not None and run.status in ("pending", "running"):
            tail = log_tail(run_id, lines=5)
            self.store.update_run(run_id, status="failed",
                                  error=f"`emu run` exited with code {code} before recording an outcome: {tail}")
            log.warning("run %s: emu run exited with %s", run_id, code)


    def refresh_kfp_status(self, run) -> None:
        """Bring an active cluster run's status up to date from the KFP API (the tasks record
        their stages into it; only KFP knows when the whole run ended). At most once per
        KFP_POLL_S per run; an unreachable API leaves the status as it is."""
        if run.backend != "kfp" or not run.kfp_run_id or run.status not in ("pending", "running"):
            return
        if not self.config.kfp_host:
            return
        now = time.monotonic()
        if now - self._polled.get(run.id, -KFP_POLL_S) < KFP_POLL_S:
            return
        self._polled[run.id] = now
        try:
            if self._kfp_client is None:
                import kfp

                self._kfp_client = kfp.Client(host=self.config.kfp_host)
            state = str(self._kfp_client.get_run(run.kfp_run_id).state or "").upper()
        except Exception as exc:  # the dashboard keeps working while the cluster API is away
            log.warning("cannot read KFP run %s from %s: %s", run.kfp_run_id, self.config.kfp_host, exc)
            return
        status = KFP_STATES.get(state)
        if status is not None and status != run.status:
            self.store.update_run(run.id, status=status,
                                  error=f"KFP run {run.kfp_run_id} ended {state}" if status != "succeeded" else None)


def log_tail(run_id: str, lines: int = 40) -> str:
    """The last lines of a background run's console output ("" when it has none)."""
    try:
        path = run_log_path(run_id)
    except EmuError:  # an id that is no file name (EMU_RUN_ID set by hand): never started in the background
        return ""
    if not path.is_file():
        return ""
    with open(path, "rb") as handle:
        handle.seek(0, 2)
        size = handle.tell()
        handle.seek(max(0, size - 64 * 1024))
        text = handle.read().decode("utf-8", errors="replace")
    # Progress bars rewrite their line with carriage returns: keep each line's last state. Colour
    # codes (kfp.local's, a tool's) would show as garbage in the page: `emu run` writes its log
    # without them, and anything else that reached the file loses them here.
    return "\n".join(strip_ansi(line.split("\r")[-1]) for line in text.splitlines()[-lines:])
