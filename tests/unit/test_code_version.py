"""Per-stage code versions (emu.pipeline.code_version): an edit changes the version of exactly the
stages whose code it touches, on a copy of this checkout's sources."""

import shutil
from pathlib import Path

import pytest

from emu.pipeline.code_version import STAGE_ENTRIES, stage_code_version, stage_code_versions, stage_files

ROOT = Path(__file__).resolve().parents[2]
TRAINING = {"stage1", "stage2", "decoder", "instruct"}


@pytest.fixture
def tree(tmp_path):
    """A copy of the sources a code version reads."""
    for folder in ("emu", "components", "configs"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def edit(path: Path, text: str = "\n# an edit\n") -> None:
    path.write_text(path.read_text(encoding="utf-8") + text, encoding="utf-8")


def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {stage for stage in before if before[stage] != after[stage]}


def test_every_pipeline_task_has_a_version_and_the_copy_matches_the_checkout(tree):
    versions = stage_code_versions(tree)
    assert set(versions) == set(STAGE_ENTRIES) == {"prepare", "validate", "stage1", "precompute", "stage2",
                                                   "decoder", "instruct", "evaluate", "register"}
    assert versions == stage_code_versions(ROOT)
    assert stage_code_version("stage1", tree) == versions["stage1"]


def test_a_dashboard_edit_changes_no_stage(tree):
    before = stage_code_versions(tree)
    edit(tree / "emu" / "dashboard" / "views.py")
    edit(tree / "emu" / "dashboard" / "templates" / "run.html", "<!-- an edit -->\n")
    assert changed(before, stage_code_versions(tree)) == set()


def test_a_training_edit_changes_the_training_stages_only(tree):
    before = stage_code_versions(tree)
    edit(tree / "emu" / "train" / "stages.py")
    assert changed(before, stage_code_versions(tree)) == TRAINING


def test_lazy_imports_inside_functions_are_followed(tree):
    """train_decoder imports its VAE phase inside the function: an edit there is the decoder's code."""
    assert Path("emu/train/vae_step.py") in stage_files("decoder", tree)
    before = stage_code_versions(tree)
    edit(tree / "emu" / "model" / "vae.py")
    after = stage_code_versions(tree)
    assert "decoder" in changed(before, after) and not {"prepare", "validate"} & changed(before, after)


def test_an_evaluation_edit_changes_evaluate_only(tree):
    before = stage_code_versions(tree)
    edit(tree / "emu" / "evaluate" / "harness.py")
    assert changed(before, stage_code_versions(tree)) == {"evaluate"}


def test_shared_task_code_presets_and_dependency_pins_change_every_stage(tree):
    for path, text in ((tree / "emu" / "pipeline" / "tasks.py", "\n# an edit\n"),
                       (tree / "configs" / "tiny.yaml", "\n# an edit\n")):
        before = stage_code_versions(tree)
        edit(path, text)
        assert changed(before, stage_code_versions(tree)) == set(STAGE_ENTRIES), path
    before = stage_code_versions(tree)
    pyproject = tree / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"diffusers==0.42.1"', '"diffusers==0.43.0"'))
    assert changed(before, stage_code_versions(tree)) == set(STAGE_ENTRIES)


def test_an_unknown_stage_is_refused(tree):
    with pytest.raises(KeyError, match="no pipeline stage 'stage3'"):
        stage_files("stage3", tree)
