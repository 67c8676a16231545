"""The validation gate: scan datasets, run the suites, decide, and report (`emu validate`).

Exit contract (emu.cli): the gate passes (0) or fails (1) with one line per failing rule naming
shards and keys; unusable input raises DatasetError/EmuError (2) and no report.json is written.

Everything is written into the report folder and nowhere else:
  report.json            verdict, config, datasets with sample counts per kind, every rule's result
                         with each failing (dataset, shard, key) and its per-sample message
  manifest.parquet       one row of facts per sample (emu.validate.scan.MANIFEST_SCHEMA)
  validate.config.yaml   the resolved config, loadable as a preset
  data_docs/index.html   Great Expectations Data Docs of the run
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from emu.config import save_resolved, to_dict
from emu.data.shards import DATASET_FILE
from emu.errors import DatasetError
from emu.validate import ValidateConfig
from emu.validate.rules import INDEX_COLUMNS, SAMPLES, SHARDS, Rule, SuiteSpec, build_suites
from emu.validate.scan import DatasetScan, find_datasets, plan_dataset, write_manifest
from emu.validate.suites import Outcome, run_suites

log = logging.getLogger(__name__)

REPORT_FILE = "report.json"
MANIFEST_FILE = "manifest.parquet"
CONFIG_FILE = "validate.config.yaml"
DOCS_DIR = "data_docs"
#: Failing keys listed per rule in the summary; report.json lists them all.
SUMMARY_KEYS = 10
_SUMMARY_MESSAGE_CHARS = 100


@dataclass
class Failure:
    """One failing row: where it is and what exactly was wrong with it."""

    dataset: str
    shard: str
    key: str | None  # None for shard-level rules
    message: str

    @property
    def location(self) -> str:
        where = f"{self.dataset}/{self.shard}"
        return where if self.key is None else f"{where}:{self.key}"


@dataclass
class RuleResult:
    """A rule's verdict in one suite (a rule may run as several GX expectations; all must pass)."""

    rule: str
    suite: str
    kind: str | None
    description: str
    expectation_types: list[str]
    success: bool
    checked: int  # rows the rule applied to
    unit: str  # "samples" or "shards"
    failures: list[Failure] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # expectations that raised

    @property
    def scope(self) -> str:
        return self.kind or self.suite

    @property
    def unexpected_fraction(self) -> float:
        return len(self.failures) / self.checked if self.checked else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"rule": self.rule, "suite": self.suite, "kind": self.kind,
                "description": self.description, "expectation_types": self.expectation_types,
                "success": self.success, "checked": self.checked,
                "unexpected_count": len(self.failures),
                "unexpected_fraction": self.unexpected_fraction, "errors": self.errors,
                "failures": [f.__dict__ for f in self.failures]}


@dataclass
class GateResult:
    """The verdict of one gate run and everything needed to explain it."""

    passed: bool
    report_dir: Path
    datasets: list[DatasetScan]
    rules: list[RuleResult]
    config: ValidateConfig

    @property
    def samples(self) -> int:
        return sum(d.samples for d in self.datasets)

    @property
    def failed_rules(self) -> list[RuleResult]:
        return [r for r in self.rules if not r.success]

    @property
    def report_path(self) -> Path:
        return self.report_dir / REPORT_FILE

    def summary_lines(self) -> list[str]:
        """What `emu validate` prints: a verdict header, one line per failing rule (and per rule
        whose failures were tolerated), and where the report is."""
        verdict = "PASSED" if self.passed else f"FAILED ({len(self.failed_rules)} of {len(self.rules)} rules)"
        lines = [f"validation {verdict}: {len(self.datasets)} datasets, {self.samples} samples, "
                 f"{sum(len(d.shards) for d in self.datasets)} shards"]
        for rule in self.rules:
            if not rule.success:
                lines.append("FAIL " + _describe_rule(rule))
            elif rule.failures:
                lines.append(f"TOLERATED (max_failure_fraction={self.config.max_failure_fraction:g}) "
                             + _describe_rule(rule))
        lines.append(f"report: {self.report_path} (Data Docs: {self.report_dir / DOCS_DIR / 'index.html'})")
        return lines

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "samples": self.samples,
            "config": to_dict(self.config),
            "datasets": [{"name": d.name, "path": str(d.path), "samples": d.samples,
                          "kinds": dict(sorted(d.kinds.items())),
                          "shards": [s.__dict__ for s in d.shards]} for d in self.datasets],
            "rules": [r.to_json() for r in self.rules],
            "manifest": MANIFEST_FILE,
            "data_docs": f"{DOCS_DIR}/index.html",
        }


def run_gate(data: Path, report: Path, config: ValidateConfig) -> GateResult:
    """Validate every dataset under `data`, write the report folder `report`, return the verdict."""
    data, report = Path(data), Path(report)
    datasets = [plan_dataset(data, d) for d in find_datasets(data)]
    _prepare_report_dir(report)
    # report.json is written last, as the commit point: a stale verdict must not outlive a failed run.
    (report / REPORT_FILE).unlink(missing_ok=True)
    write_manifest(datasets, report / MANIFEST_FILE, config.max_image_pixels)
    _require_samples(datasets)
    save_resolved(config, "validate", report / CONFIG_FILE)

    samples = _read_manifest(report / MANIFEST_FILE)
    shards = pd.DataFrame([s.__dict__ for d in datasets for s in d.shards])
    suites = build_suites(config, sorted(set(samples["kind"]) - {""}))
    outcomes = run_suites({SAMPLES: samples, SHARDS: shards}, suites,
                          mostly=1.0 - config.max_failure_fraction, docs_dir=report / DOCS_DIR)
    rules = _rule_results(suites, outcomes)
    result = GateResult(passed=all(r.success for r in rules), report_dir=report, datasets=datasets,
                        rules=rules, config=config)
    (report / REPORT_FILE).write_text(json.dumps(result.to_json(), indent=2, ensure_ascii=False),
                                      encoding="utf-8")
    log.info("validation %s; report at %s", "passed" if result.passed else "failed", result.report_path)
    return result


def _prepare_report_dir(report: Path) -> None:
    """Create the report folder, refusing one inside a dataset folder: validation never writes
    into the data it checks (a report there would also change what DVC tracks)."""
    if report.exists() and not report.is_dir():
        raise DatasetError(f"--report {report} exists and is not a folder")
    resolved = report.resolve()
    for folder in (resolved, *resolved.parents):
        if (folder / DATASET_FILE).is_file():
            raise DatasetError(f"--report {report} is inside the dataset folder {folder}; "
                               f"choose a folder outside the data")
    report.mkdir(parents=True, exist_ok=True)


def _require_samples(datasets: list[DatasetScan]) -> None:
    """A dataset whose shards hold no sample at all is unusable: a gate passing on nothing would
    let an empty import through to training."""
    empty = [d.name for d in datasets if d.samples == 0]
    if empty:
        raise DatasetError(f"dataset {', '.join(empty)} holds no samples (every shard is an empty tar)")


def _read_manifest(path: Path) -> pd.DataFrame:
    """The manifest as the GX frame: nullable booleans and integers so a null fact stays null
    (not False, not a float NaN). No rule reads the list columns; leaving them out keeps it small."""
    columns = [f.name for f in pq.read_schema(path) if not pa.types.is_list(f.type)]
    dtypes = {pa.bool_(): pd.BooleanDtype(), pa.int32(): pd.Int64Dtype(), pa.int64(): pd.Int64Dtype()}
    return pq.read_table(path, columns=columns).to_pandas(types_mapper=dtypes.get)


def _rule_results(suites: list[SuiteSpec], outcomes: list[Outcome]) -> list[RuleResult]:
    """Fold expectation outcomes into one result per (suite, rule), in suite order."""
    by_rule: dict[tuple[str, str], list[Outcome]] = {}
    for outcome in outcomes:
        by_rule.setdefault((outcome.suite, outcome.rule), []).append(outcome)
    results = []
    for spec in suites:
        for rule in spec.rules:
            results.append(_rule_result(spec, rule, by_rule[(spec.name, rule.name)]))
    return results


def _rule_result(spec: SuiteSpec, rule: Rule, parts: list[Outcome]) -> RuleResult:
    index = INDEX_COLUMNS[spec.table]
    failures: dict[tuple[str, ...], Failure] = {}
    for outcome in parts:
        for row in outcome.unexpected:
            where = tuple(row[c] for c in index)
            if where not in failures:
                values = {c: v for c, v in row.items() if c not in index}
                failures[where] = Failure(row["dataset"], row["shard"], row.get("key"), _message(rule, values))
    if rule.check == "unique":
        _name_duplicates(list(failures.values()))
    return RuleResult(
        rule=rule.name, suite=spec.name, kind=spec.kind, description=rule.description,
        expectation_types=[o.expectation_type for o in parts],
        success=all(o.success for o in parts), checked=max(o.element_count for o in parts),
        unit=spec.table, failures=list(failures.values()),
        errors=[f"{o.expectation_type}: {o.error}" for o in parts if o.error])


def _message(rule: Rule, values: dict[str, Any]) -> str:
    """The per-sample message: the manifest's own text where the offending value is an error
    column (structure_error, image_error), else the offending values."""
    text = values.get(rule.columns[0])
    if rule.check == "null" and isinstance(text, str):
        return text
    return ", ".join(f"{c}={_format(values[c])}" for c in rule.columns if c in values)


def _format(value: Any) -> str:
    if value is None:
        return "missing"
    if isinstance(value, float):
        return f"{value:.10g}"  # enough digits that 1.0000001 does not print as the limit 1
    return str(value)


def _name_duplicates(failures: list[Failure]) -> None:
    """A duplicate key's message names every shard holding it."""
    shards: dict[tuple[str, str | None], list[str]] = {}
    for failure in failures:
        shards.setdefault((failure.dataset, failure.key), []).append(failure.shard)
    for failure in failures:
        where = shards[(failure.dataset, failure.key)]
        failure.message = f"key {failure.key!r} is in {', '.join(sorted(where))}"


def _describe_rule(rule: RuleResult) -> str:
    listed = [f"{f.location} ({_clip(f.message)})" for f in rule.failures[:SUMMARY_KEYS]]
    more = len(rule.failures) - SUMMARY_KEYS
    if more > 0:
        listed.append(f"and {more} more")
    line = f"{rule.rule} [{rule.scope}] {len(rule.failures)}/{rule.checked} {rule.unit}: {', '.join(listed)}"
    if rule.errors:
        line += f" (expectation error: {'; '.join(rule.errors)})"
    return line


def _clip(message: str) -> str:
    message = " ".join(message.split())
    if len(message) <= _SUMMARY_MESSAGE_CHARS:
        return message
    return message[: _SUMMARY_MESSAGE_CHARS - 3] + "..."
