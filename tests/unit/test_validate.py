"""Validation gate pieces that need no Great Expectations: config checks, the rule table, dataset
discovery, report-folder safety, and the summary lines."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import emu
from emu.config import resolve
from emu.data.images import DEFAULT_MAX_PIXELS
from emu.data.schema import KINDS
from emu.errors import ConfigError, DatasetError
from emu.validate import ValidateConfig
from emu.validate.gate import Failure, GateResult, RuleResult, _prepare_report_dir
from emu.validate.rules import SAMPLES, SHARDS, build_suites, kind_rules
from emu.validate.scan import DatasetScan, find_datasets


def test_config_defaults():
    config = ValidateConfig()
    assert config.max_failure_fraction == 0.0
    assert config.max_image_pixels == DEFAULT_MAX_PIXELS
    assert (config.min_frames, config.max_frames, config.vqa_answers, config.min_boxes) == (2, 64, 10, 1)


@pytest.mark.parametrize("override, setting", [
    ("max_failure_fraction=1.5", "validate.max_failure_fraction"),
    ("max_failure_fraction=-0.1", "validate.max_failure_fraction"),
    ("max_failure_fraction=.nan", "validate.max_failure_fraction"),
    ("min_text_chars=-1", "validate.min_text_chars"),
    ("max_text_chars=0", "validate.max_text_chars"),
    ("min_image_side=0", "validate.min_image_side"),
    ("max_aspect_ratio=0.5", "validate.max_aspect_ratio"),
    ("max_aspect_ratio=.inf", "validate.max_aspect_ratio"),
    ("max_image_pixels=100", "validate.max_image_pixels"),
    ("min_frames=0", "validate.min_frames"),
    ("max_frames=1", "validate.max_frames"),
    ("vqa_answers=0", "validate.vqa_answers"),
    ("min_boxes=-1", "validate.min_boxes"),
])
def test_config_errors_name_the_setting(override, setting):
    with pytest.raises(ConfigError, match=setting):
        resolve(ValidateConfig, "validate", None, [override])


def test_config_override():
    config = resolve(ValidateConfig, "validate", None, ["max_failure_fraction=0.05", "min_image_side=64"])
    assert (config.max_failure_fraction, config.min_image_side) == (0.05, 64)


def test_suites_structure_shards_and_one_per_kind_present():
    suites = build_suites(ValidateConfig(), ["pair", "chat", "bogus"])
    assert [(s.name, s.table, s.kind) for s in suites] == [
        ("structure", SAMPLES, None), ("shards", SHARDS, None),
        ("kind_chat", SAMPLES, "chat"), ("kind_pair", SAMPLES, "pair")]


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_has_text_rules_and_unique_rule_names(kind):
    names = [r.name for r in kind_rules(kind, ValidateConfig())]
    assert len(names) == len(set(names))
    assert {"text_nonempty", "text_length_max", "text_unicode_ok"} <= set(names)
    assert ("image_decodable" in names) == (kind != "text")


def test_rules_take_limits_from_config():
    config = ValidateConfig(min_image_side=100, vqa_answers=3, max_aspect_ratio=2.5)
    pair = {r.name: r for r in kind_rules("pair", config)}
    assert pair["image_side_min"].min_value == 100
    assert pair["image_aspect_max"].max_value == 2.5
    assert pair["video_frames"].when == ("n_frames", ">", 0)  # image pairs have no frames
    vqa = {r.name: r for r in kind_rules("vqa", config)}["vqa_answers"]
    assert (vqa.min_value, vqa.max_value) == (3, 3)


def test_facts_always_set_for_a_kind_are_required():
    """GX skips nulls: a required rule adds a not-null check so a missing fact cannot pass."""
    grounded = {r.name: r for r in kind_rules("grounded", ValidateConfig())}
    assert grounded["boxes_finite"].required and grounded["phrase_spans_ok"].required
    # Null coordinates mean non-finite boxes, which boxes_finite already fails.
    assert not grounded["box_coord_min"].required
    assert {r.name: r for r in kind_rules("pair", ValidateConfig())}["text_nonempty"].required
    assert not {r.name: r for r in kind_rules("video_text", ValidateConfig())}["text_nonempty"].required


def _dataset(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps({"format_version": 1, "shards": []}))
    return folder


def test_find_datasets(tmp_path):
    a = _dataset(tmp_path / "b" / "a")
    z = _dataset(tmp_path / "a" / "z")
    _dataset(tmp_path / "a" / "z" / "inner")  # inside a dataset: its own business
    _dataset(tmp_path / ".dvc" / "cache")
    (tmp_path / "c").mkdir()
    assert find_datasets(tmp_path) == [z, a]
    assert find_datasets(a) == [a]
    with pytest.raises(DatasetError, match="no dataset.json under"):
        find_datasets(tmp_path / "c")
    with pytest.raises(DatasetError, match="is not a folder"):
        find_datasets(tmp_path / "missing")


def test_report_folder_inside_a_dataset_is_refused(tmp_path):
    dataset = _dataset(tmp_path / "ds")
    for inside in (dataset, dataset / "report", dataset / "deep" / "report"):
        with pytest.raises(DatasetError, match="inside the dataset folder"):
            _prepare_report_dir(inside)
    assert sorted(p.name for p in dataset.iterdir()) == ["dataset.json"]
    (tmp_path / "file").write_text("")
    with pytest.raises(DatasetError, match="not a folder"):
        _prepare_report_dir(tmp_path / "file")
    _prepare_report_dir(tmp_path / "out" / "report")
    assert (tmp_path / "out" / "report").is_dir()


def _rule(name: str, n_failures: int, success: bool, checked: int = 50) -> RuleResult:
    failures = [Failure("ds", "shard-000000.tar", f"k{i}", f"image 0: image_undecodable: bad {i}")
                for i in range(n_failures)]
    return RuleResult(rule=name, suite="kind_pair", kind="pair", description="", expectation_types=[],
                      success=success, checked=checked, unit="samples", failures=failures)


def test_summary_lines(tmp_path):
    dataset = DatasetScan(name="ds", path=tmp_path, shard_paths=[], index={})
    dataset.kinds.update({"pair": 50})
    result = GateResult(passed=False, report_dir=tmp_path, datasets=[dataset], config=ValidateConfig(),
                        rules=[_rule("image_decodable", 12, False), _rule("image_side_min", 0, True),
                               _rule("image_aspect_max", 1, True)])
    lines = result.summary_lines()
    assert lines[0] == "validation FAILED (1 of 3 rules): 1 datasets, 50 samples, 0 shards"
    assert lines[1].startswith("FAIL image_decodable [pair] 12/50 samples: "
                               "ds/shard-000000.tar:k0 (image 0: image_undecodable: bad 0), ")
    assert lines[1].endswith("ds/shard-000000.tar:k9 (image 0: image_undecodable: bad 9), and 2 more")
    assert lines[2].startswith("TOLERATED (max_failure_fraction=0) image_aspect_max [pair] 1/50 samples")
    assert lines[3] == f"report: {tmp_path / 'report.json'} (Data Docs: {tmp_path / 'data_docs' / 'index.html'})"


def test_great_expectations_is_imported_only_by_the_suites_module():
    package = Path(emu.__file__).parent
    gx_import = re.compile(r"^\s*(import|from) great_expectations\b", re.MULTILINE)
    importers = sorted(str(p.relative_to(package)) for p in package.rglob("*.py")
                       if gx_import.search(p.read_text(encoding="utf-8")))
    assert importers == ["validate/suites.py"]
    code = ("import sys, emu.cli, emu.validate.gate, emu.validate.suites; "
            "print('great_expectations' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
