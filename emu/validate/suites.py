"""Great Expectations adapter: the only module that imports GX (DESIGN.md convention 5).

GX is imported inside `run_suites` because the import takes seconds; importing this module costs
nothing. One ephemeral context per run: a pandas data source with two dataframe assets (the
sample manifest and the shard table), one expectation suite per SuiteSpec, kind suites
restricted to their kind with GX 1.x row conditions (`Column("kind") == kind`), one checkpoint per
table with COMPLETE result format so every failing row comes back with its index columns, and a
filesystem Data Docs site under the report folder.

Results are returned as plain data (Outcome); deciding pass/fail and reporting is the gate's job.
A failed checkpoint does not raise.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from emu.validate.rules import INDEX_COLUMNS, Rule, SuiteSpec

_DOCS_SITE = "emu"
_OPERATORS = {"==": operator.eq, "!=": operator.ne, ">": operator.gt, ">=": operator.ge,
              "<": operator.lt, "<=": operator.le}


@dataclass
class Outcome:
    """One expectation's result as plain data."""

    suite: str
    rule: str
    expectation_type: str
    success: bool
    element_count: int
    #: One dict per failing row: its index columns and the offending column values (None if null).
    unexpected: list[dict[str, Any]]
    #: Set when the expectation itself raised (a bug or a column missing), never silently passed.
    error: str | None = None


def run_suites(tables: dict[str, pd.DataFrame], suites: list[SuiteSpec], mostly: float,
               docs_dir: Path) -> list[Outcome]:
    """Validate `tables` (rules.SAMPLES, rules.SHARDS) against `suites`, one checkpoint per table,
    and build Data Docs in `docs_dir`. `mostly` applies to every rule that is not strict."""
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral", project_config=_project_config(docs_dir))
    source = context.data_sources.add_pandas("emu_manifest")
    outcomes: list[Outcome] = []
    for table, frame in tables.items():
        batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("all")
        definitions = [_add_suite(context, spec, batch, mostly) for spec in suites if spec.table == table]
        checkpoint = context.checkpoints.add(gx.Checkpoint(
            name=f"emu_gate_{table}", validation_definitions=definitions,
            result_format={"result_format": "COMPLETE",
                           "unexpected_index_column_names": list(INDEX_COLUMNS[table])}))
        result = checkpoint.run(batch_parameters={"dataframe": frame})
        for validation in result.run_results.values():
            outcomes += [_outcome(validation.suite_name, r) for r in validation.results]
    context.build_data_docs(site_names=[_DOCS_SITE])
    return outcomes


def _add_suite(context: Any, spec: SuiteSpec, batch: Any, mostly: float) -> Any:
    """Register the suite of `spec` and its validation definition over `batch`."""
    import great_expectations as gx

    suite = context.suites.add(gx.ExpectationSuite(name=spec.name))
    for rule in spec.rules:
        for expectation in _expectations(rule, spec, mostly):
            suite.add_expectation(expectation)
    return context.validation_definitions.add(gx.ValidationDefinition(name=spec.name, data=batch, suite=suite))


def _project_config(docs_dir: Path) -> Any:
    """In-memory stores, no analytics, no progress bars, and one Data Docs site: ours.

    The default ephemeral config adds a docs site in a temporary folder; we write nowhere but the
    report folder.
    """
    from great_expectations.data_context.types.base import (DataContextConfig,
                                                            InMemoryStoreBackendDefaults,
                                                            ProgressBarsConfig)

    return DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
        data_docs_sites={_DOCS_SITE: {
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                              "base_directory": str(Path(docs_dir).resolve())},  # GX needs it absolute
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }},
    )


def _expectations(rule: Rule, spec: SuiteSpec, mostly: float) -> list[Any]:
    """The GX expectations of one rule: the check itself, plus not-null checks when required."""
    import great_expectations.expectations as gxe

    common: dict[str, Any] = {
        "mostly": 1.0 if rule.strict else mostly,
        "meta": {"rule": rule.name, "description": rule.description},
    }
    condition = _row_condition(rule, spec)
    if condition is not None:
        common["row_condition"] = condition
    column = rule.columns[0]
    if rule.check == "null":
        checks = [gxe.ExpectColumnValuesToBeNull(column=column, **common)]
    elif rule.check == "true":
        checks = [gxe.ExpectColumnValuesToBeInSet(column=column, value_set=[True], **common)]
    elif rule.check == "between":
        checks = [gxe.ExpectColumnValuesToBeBetween(
            column=column, min_value=rule.min_value, max_value=rule.max_value,
            strict_min=rule.strict_min, **common)]
    elif rule.check == "equal":
        checks = [gxe.ExpectColumnPairValuesToBeEqual(
            column_A=rule.columns[0], column_B=rule.columns[1], **common)]
    elif rule.check == "unique":
        checks = [gxe.ExpectCompoundColumnsToBeUnique(column_list=list(rule.columns), **common)]
    else:
        raise ValueError(f"rule {rule.name}: unknown check {rule.check!r}")
    if rule.required:
        checks += [gxe.ExpectColumnValuesToNotBeNull(column=c, **common) for c in rule.columns]
    return checks


def _row_condition(rule: Rule, spec: SuiteSpec) -> Any:
    """The GX 1.x Condition selecting the rows a rule applies to (None: every row)."""
    from great_expectations.expectations.row_conditions import Column

    parts = []
    if spec.kind is not None:
        parts.append(Column("kind") == spec.kind)
    if rule.when is not None:
        name, op, value = rule.when
        parts.append(_OPERATORS[op](Column(name), value))
    if not parts:
        return None
    condition = parts[0]
    for part in parts[1:]:
        condition = condition & part
    return condition


def _outcome(suite: str, result: Any) -> Outcome:
    config = result.expectation_config
    details = result.result or {}
    error = _exception_message(result.exception_info or {})
    return Outcome(
        suite=suite, rule=config.meta["rule"], expectation_type=config.type,
        success=bool(result.success) and error is None,
        element_count=int(details.get("element_count") or 0),
        unexpected=[{k: _plain(v) for k, v in row.items()}
                    for row in details.get("unexpected_index_list") or []],
        error=error)


def _exception_message(info: dict[str, Any]) -> str | None:
    """The message of an exception an expectation raised. GX 1.24 reports it either flat
    (`{"raised_exception": True, ...}`) or keyed by the metric that failed to compute."""
    entries = [info] if "raised_exception" in info else [v for v in info.values() if isinstance(v, dict)]
    messages = [str(e.get("exception_message")) for e in entries if e.get("raised_exception")]
    return "; ".join(messages) or None


def _plain(value: Any) -> Any:
    """numpy/pandas scalars as Python values, NaN and NA as None (for JSON and messages)."""
    if value is None or value is pd.NA:
        return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
