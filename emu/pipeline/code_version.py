"""Per-stage code versions: what a task's cache key says about the code it runs.

One hash of every source file made any edit (a dashboard template, a docstring in the lineage
CLI) a new cache key for every task, so a 37B training re-ran for a change it never executes.
Instead each stage's version covers:

- the modules the stage runs: its entry modules (`STAGE_ENTRIES`) and every `emu` module they
  import, followed through imports anywhere in a module (the tasks import lazily inside functions);
- the shared task glue (`emu/pipeline/tasks.py` and what it imports at module level, the
  stage's KFP component) and the presets (`configs/`, which tasks read for unstated settings);
- the locked dependencies (`pyproject.toml`'s pinned requirements): a new torch or diffusers can
  change what training writes.

Nothing else: the dashboard, the lineage store, the CLI and the benchmarks change no stage's
version unless a stage imports them. The closure is a static over-approximation (an import in a
branch that never runs still counts), which errs on the side of re-running.
"""

from __future__ import annotations

import ast
import hashlib
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: The modules each pipeline task calls into (emu.pipeline.tasks, per task function).
_TRAINING = ("emu.train.stages", "emu.cluster.launch")
STAGE_ENTRIES: dict[str, tuple[str, ...]] = {
    "prepare": ("emu.data.prepare", "emu.data.synth", "emu.artifacts.s3"),
    "validate": ("emu.validate.gate",),
    "stage1": _TRAINING,
    "precompute": ("emu.precompute.job", "emu.cluster.ray_launch"),
    "stage2": _TRAINING,
    "decoder": _TRAINING,
    "instruct": _TRAINING,
    "evaluate": ("emu.evaluate.gate", "emu.evaluate.harness", "emu.evaluate.report"),
    "register": ("emu.lineage.store",),
}
#: Shared by every task: the module holding the task functions; its module-level imports are followed.
GLUE = "emu.pipeline.tasks"
#: Registries whose imports are not followed: emu.sections lazily maps every preset section to its
#: config class, and a stage resolves only its own (whose module its entries import anyway).
REGISTRIES = frozenset({"emu.sections"})


def stage_code_versions(root: Path | None = None) -> dict[str, str]:
    """{stage: 16-hex version} for every pipeline task, from the sources under `root` (this checkout)."""
    parsed: dict = {}
    return {stage: _version(root or ROOT, stage, parsed) for stage in STAGE_ENTRIES}


def stage_code_version(stage: str, root: Path | None = None) -> str:
    """The version of one stage's code (a task's own, e.g. for its checkpoints' resume key)."""
    return _version(root or ROOT, stage, {})


def combined(versions: dict[str, str]) -> str:
    """One hash of every stage's version: what a run records as its code (lineage, dashboard)."""
    return hashlib.sha256("".join(f"{s}={v};" for s, v in sorted(versions.items())).encode()).hexdigest()[:16]


def stage_files(stage: str, root: Path | None = None, parsed: dict | None = None) -> list[Path]:
    """The files `stage`'s version covers, relative to `root`, sorted. `parsed` memoises the
    imports of each file across stages of one call."""
    if stage not in STAGE_ENTRIES:
        raise KeyError(f"no pipeline stage {stage!r}; stages: {', '.join(STAGE_ENTRIES)}")
    root, parsed = root or ROOT, {} if parsed is None else parsed
    modules = _closure(root, STAGE_ENTRIES[stage], parsed)
    glue = _module_file(root, GLUE)
    modules |= {glue} | _closure(root, tuple(_imports(root, glue, top_level_only=True)), parsed)
    files = {m.relative_to(root) for m in modules}
    component = root / "components" / f"{stage}.py"
    if component.is_file():
        files.add(component.relative_to(root))
    files |= {p.relative_to(root) for p in (root / "configs").glob("*.y*ml")}
    return sorted(files)


def _version(root: Path, stage: str, parsed: dict) -> str:
    digest = hashlib.sha256()
    for path in stage_files(stage, root, parsed):
        digest.update(str(path).encode() + b"\0" + (root / path).read_bytes() + b"\0")
    digest.update(_locked_dependencies(root).encode())
    return digest.hexdigest()[:16]


def _locked_dependencies(root: Path) -> str:
    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return "\n".join(sorted(project.get("dependencies", [])))


def _closure(root: Path, entries: tuple[str, ...], parsed: dict) -> set[Path]:
    """The files of `entries` and of every emu module they import, transitively."""
    registries = {_module_file(root, name) for name in REGISTRIES}
    seen: set[Path] = set()
    pending = [_module_file(root, name) for name in entries]
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        if path in registries:
            continue
        if path not in parsed:
            parsed[path] = [_module_file(root, name) for name in _imports(root, path, top_level_only=False)]
        pending += parsed[path]
    return seen


def _module_file(root: Path, name: str) -> Path:
    parts = name.split(".")
    module, package = root.joinpath(*parts).with_suffix(".py"), root.joinpath(*parts, "__init__.py")
    if module.is_file():
        return module
    if package.is_file():
        return package
    raise FileNotFoundError(f"module {name} not found under {root}")


def _imports(root: Path, path: Path, *, top_level_only: bool) -> list[str]:
    """The emu modules `path` imports (with the packages above them, whose __init__ runs)."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    package = ".".join(path.relative_to(root).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            # `from emu.x import y`: y is a module when a file says so, else a name in emu.x.
            names |= {f"{base}.{alias.name}" for alias in node.names}
    found: set[str] = set()
    for name in names:
        if name != "emu" and not name.startswith("emu."):
            continue
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):  # the packages above run their __init__
            prefix = ".".join(parts[:depth])
            if _exists(root, prefix):
                found.add(prefix)
    return sorted(found)


def _exists(root: Path, name: str) -> bool:
    parts = name.split(".")
    return root.joinpath(*parts).with_suffix(".py").is_file() or root.joinpath(*parts, "__init__.py").is_file()
