"""The evaluation gate: thresholds a candidate model's metrics must meet (used by `register`).

Baseline file (YAML or JSON), one entry per metric name as the metrics JSON / KFP metrics name
it (emu.evaluate.report.kfp_metrics):

    metrics:
      vqav2_overall:      {threshold: 65.0, direction: higher, tolerance: 0.5}
      coco_captions_cider: {threshold: 1.10, direction: higher}
      t2i_fid:            {threshold: 12.0, direction: lower, tolerance: 0.2}

`higher`: passes when value >= threshold - tolerance; `lower`: value <= threshold + tolerance.
A metric the baseline names but the candidate lacks fails the gate (an evaluation that did not
run must not pass), and so does a NaN or infinite value. Metrics the baseline does not name are
ignored.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from emu.errors import ConfigError

__all__ = ["GateCheck", "GateConfig", "GateResult", "MetricThreshold", "check_gate", "compare", "direction_of",
           "gate_lines", "gate_table", "load_gate"]

Direction = Literal["higher", "lower"]
#: Metrics whose smaller values are better, by their last name part (FID: a distance between
#: feature distributions; MSE: a pixel error); every other metric here (accuracy, CIDEr, CLIP
#: scores) is higher-better.
LOWER_IS_BETTER = frozenset({"fid", "mse"})


def direction_of(metric: str) -> Direction:
    """Which way `metric` improves, from its name (emu.evaluate.report.metric_name form)."""
    return "lower" if metric.rsplit("_", 1)[-1] in LOWER_IS_BETTER else "higher"


@dataclass
class MetricThreshold:
    """The bar for one metric."""

    #: The value the candidate must reach (e.g. the production model's score, or a floor).
    threshold: float
    #: "higher" when larger is better (accuracy, CIDEr, CLIP), "lower" when smaller is (FID).
    direction: Direction = "higher"
    #: Slack in the metric's own units: run-to-run noise that should not block a release.
    tolerance: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not math.isfinite(self.threshold):
            raise ConfigError(f"gate threshold must be a finite number, got {self.threshold!r}")
        if self.direction not in ("higher", "lower"):
            raise ConfigError(f"gate direction must be 'higher' or 'lower', got {self.direction!r}")
        if isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float)) \
                or not math.isfinite(self.tolerance) or self.tolerance < 0:
            raise ConfigError(f"gate tolerance must be a finite number >= 0, got {self.tolerance!r}")
        self.threshold = float(self.threshold)
        self.tolerance = float(self.tolerance)

    @property
    def bound(self) -> float:
        """The worst value that still passes."""
        return self.threshold - self.tolerance if self.direction == "higher" else self.threshold + self.tolerance


@dataclass
class GateConfig:
    """Per-metric thresholds; the on-disk form is `{"metrics": {name: {threshold, direction,
    tolerance}}}`."""

    metrics: dict[str, MetricThreshold] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.metrics:
            raise ConfigError("gate.metrics must name at least one metric (an empty gate passes everything)")
        for name, spec in list(self.metrics.items()):
            if not isinstance(name, str) or not name:
                raise ConfigError(f"gate metric names must be non-empty strings, got {name!r}")
            if isinstance(spec, Mapping):
                self.metrics[name] = _threshold(name, spec)
            elif not isinstance(spec, MetricThreshold):
                raise ConfigError(f"gate.metrics.{name} must be a mapping with threshold/direction/tolerance, got {spec!r}")

    @classmethod
    def from_dict(cls, data: Any, source: str = "gate") -> GateConfig:
        if not isinstance(data, Mapping) or set(data) != {"metrics"} or not isinstance(data["metrics"], Mapping):
            raise ConfigError(f"{source}: a gate baseline is a mapping with one key, \"metrics\", "
                              f"mapping each metric name to {{threshold, direction, tolerance}}")
        return cls(metrics=dict(data["metrics"]))

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": {name: {"threshold": t.threshold, "direction": t.direction, "tolerance": t.tolerance}
                            for name, t in self.metrics.items()}}


def _threshold(name: str, spec: Mapping[str, Any]) -> MetricThreshold:
    unknown = set(spec) - {"threshold", "direction", "tolerance"}
    if unknown:
        raise ConfigError(f"gate.metrics.{name}: unknown setting {sorted(unknown)[0]!r}; "
                          f"valid settings: direction, threshold, tolerance")
    if "threshold" not in spec:
        raise ConfigError(f"gate.metrics.{name}: threshold is required")
    try:
        return MetricThreshold(**spec)
    except ConfigError as exc:
        raise ConfigError(f"gate.metrics.{name}: {exc}") from None


def load_gate(path: str | Path) -> GateConfig:
    """Read a baseline file: `.json` as JSON, anything else as YAML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"gate baseline {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text)
    except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError
        raise ConfigError(f"gate baseline {path} cannot be parsed: {exc}") from None
    return GateConfig.from_dict(data, str(path))


@dataclass(frozen=True)
class GateCheck:
    """One metric's verdict."""

    metric: str
    passed: bool
    value: float | None
    threshold: MetricThreshold
    message: str
    #: What the threshold is: "production v3", "chance", "" for a baseline file's number.
    reference: str = ""
    #: The value must lie beyond the threshold, not reach it (beating chance).
    strict: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The verdict as plain data (gate.json, the dashboard, the CLI summary)."""
        t = self.threshold
        return {"metric": self.metric, "passed": self.passed, "value": self.value, "reference": self.reference,
                "threshold": t.threshold, "direction": t.direction, "tolerance": t.tolerance, "bound": t.bound,
                "strict": self.strict, "message": self.message}


@dataclass(frozen=True)
class GateResult:
    """`passed` only when every named metric passed; `reasons` says why not (one line per failing
    metric), `checks` holds every metric's verdict."""

    passed: bool
    reasons: list[str]
    checks: list[GateCheck]

    def summary_lines(self) -> list[str]:
        head = "gate passed" if self.passed else f"gate FAILED ({len(self.reasons)} of {len(self.checks)} metrics)"
        return [head] + [("  ok    " if c.passed else "  FAIL  ") + c.message for c in self.checks]

    def to_dict(self, against: str = "") -> dict[str, Any]:
        """The verdict as plain data; `against` says what the thresholds are (gate_lines)."""
        return {"passed": self.passed, "against": against, "reasons": list(self.reasons),
                "checks": [c.to_dict() for c in self.checks]}


def check_gate(metrics: Mapping[str, Any], baseline: GateConfig | Mapping[str, Any] | str | Path) -> GateResult:
    """Compare `metrics` against the baseline. `metrics` is flat `{name: number}` (the "metrics"
    of a metrics JSON) or nested (a scoring result); names are normalised as kfp_metrics does
    ("VQAv2.overall" and {"vqav2": {"overall": ...}} are both `vqav2_overall`)."""
    if isinstance(baseline, (str, Path)):
        baseline = load_gate(baseline)
    elif not isinstance(baseline, GateConfig):
        baseline = GateConfig.from_dict(baseline)
    flat = _flatten(metrics)
    checks: list[GateCheck] = []
    from emu.evaluate.report import metric_name

    for name, spec in baseline.metrics.items():
        checks.append(compare(name, flat.get(metric_name(name)), spec))
    reasons = [c.message for c in checks if not c.passed]
    return GateResult(passed=not reasons, reasons=reasons, checks=checks)


def compare(name: str, value: Any, spec: MetricThreshold, reference: str = "", strict: bool = False) -> GateCheck:
    """One metric against its threshold. `strict`: the value must lie beyond the threshold, not
    reach it (beating chance). `reference` names what the threshold is in the message."""
    op = ({"higher": ">", "lower": "<"} if strict else {"higher": ">=", "lower": "<="})[spec.direction]
    want = f"{op} {spec.bound:g} ({spec.direction} is better; {reference or 'threshold'} {spec.threshold:g}" + \
           (f", tolerance {spec.tolerance:g})" if spec.tolerance else ")")
    def check(passed: bool, checked: float | None, message: str) -> GateCheck:
        return GateCheck(name, passed, checked, spec, message, reference, strict)

    if value is None:
        return check(False, None, f"{name}: missing from the candidate's metrics; needs {want}")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return check(False, None, f"{name}: not a number ({value!r}); needs {want}")
    value = float(value)
    if not math.isfinite(value):
        return check(False, value, f"{name} = {value}: not finite; needs {want}")
    if strict:
        ok = value > spec.bound if spec.direction == "higher" else value < spec.bound
    else:
        ok = value >= spec.bound if spec.direction == "higher" else value <= spec.bound
    return check(ok, value, f"{name} = {value:g}; needs {want}")


def gate_lines(gate: Mapping[str, Any]) -> list[str]:
    """A gate verdict (GateResult-like dict: passed, against, checks) as console lines: one per
    metric with its value, the reference value, the tolerance and the verdict."""
    checks = gate.get("checks") or []
    against = f" against {gate['against']}" if gate.get("against") else ""
    lines = [f"gate {'passed' if gate.get('passed') else 'FAILED'}{against}"]
    for c in checks:
        value = "-" if c.get("value") is None else f"{c['value']:.4g}"
        tolerance = f", tolerance {c['tolerance']:g}" if c.get("tolerance") else ", tolerance 0"
        lines.append(f"  {'ok' if c['passed'] else 'FAIL':<4}  {c['metric']:<28} {value:>9}   "
                     f"{c.get('reference') or 'threshold'} {c['threshold']:.4g}{tolerance} "
                     f"({c['direction']} is better; needs {_op(c)} {c['bound']:.4g})")
    if not checks:
        lines += [f"  {reason}" for reason in gate.get("reasons", [])]
    return lines


def gate_table(gate: Mapping[str, Any]):
    """The verdict per metric as a report table (Markdown, HTML, the dashboard's report.json)."""
    from emu.evaluate.report import Table

    rows = [[c["metric"], c.get("value"), c.get("reference") or "threshold", c["threshold"], c.get("tolerance", 0.0),
             c["direction"], f"{_op(c)} {c['bound']:.4g}", "ok" if c["passed"] else "FAIL"]
            for c in gate.get("checks") or []]
    caption = f"{'passed' if gate.get('passed') else 'FAILED'}" + (f" against {gate['against']}" if gate.get("against") else "")
    return Table(columns=["metric", "value", "reference", "reference value", "tolerance", "better", "needs", "verdict"],
                 rows=rows, caption=caption)


def _op(check: Mapping[str, Any]) -> str:
    strict = check.get("strict", False)
    return ({"higher": ">", "lower": "<"} if strict else {"higher": ">=", "lower": "<="})[check["direction"]]


def _flatten(metrics: Mapping[str, Any], path: tuple[str, ...] = ()) -> dict[str, Any]:
    """Leaves by their KFP metric name (emu.evaluate.report.metric_name), so a gate names metrics
    exactly as the metrics JSON and the KFP UI show them; non-numbers are kept to be reported."""
    from emu.evaluate.report import metric_name

    out: dict[str, Any] = {}
    for key, value in metrics.items():
        here = path + (str(key),)
        if isinstance(value, Mapping):
            out.update(_flatten(value, here))
        else:
            out[metric_name(*here)] = value
    return out
