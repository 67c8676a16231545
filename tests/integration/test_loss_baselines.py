"""The first steps of every training stage on the tiny preset (CPU, fp32, seed 0) against the
curves recorded in tests/baselines/loss_curves.json (tests/loss_baselines.py).

Tolerance: |fresh - recorded| <= 1e-6 + 2e-3 * |recorded| per value (loss and its components,
every step). One-thread fp32 CPU runs are bit-identical on one machine; another CPU or thread
count sums in another order, measured at < 2e-7 relative after 6 steps (1 vs 2 threads here), so
2e-3 is only ever crossed by a change to what the stages compute. Re-record on purpose with
`scripts/record-loss-baselines`.
"""

import copy
import json

from tests.loss_baselines import ATOL, BASELINES, RECORD_COMMAND, RTOL, STEPS, compare, report, run_curves


def recorded() -> dict:
    assert BASELINES.is_file(), f"no baselines at {BASELINES}; record them with {RECORD_COMMAND}"
    return json.loads(BASELINES.read_text())


def test_the_first_steps_of_every_stage_match_the_recorded_loss_curves(world, tmp_path):
    baselines = recorded()
    assert baselines["steps"] == STEPS, f"recorded with {baselines['steps']} steps, the module runs {STEPS}: " \
                                        f"re-record with {RECORD_COMMAND}"
    fresh = {"stages": run_curves(world, tmp_path, STEPS)}
    assert {"stage1", "stage2", "decoder", "instruct"} <= set(fresh["stages"])
    problems = compare(baselines, fresh, rtol=RTOL, atol=ATOL)
    assert not problems, report(problems)


def test_a_moved_value_is_reported_by_stage_step_and_key_with_the_command():
    """The comparison itself, on the recorded file: within tolerance passes, beyond it names what moved."""
    baselines = recorded()
    assert not compare(baselines, copy.deepcopy(baselines))
    nudged = copy.deepcopy(baselines)
    row = nudged["stages"]["stage2"]["curve"][2]
    row["image_loss"] *= 1 + RTOL / 2
    assert not compare(baselines, nudged), "half the tolerance is within it"
    row["image_loss"] *= 1 + 2 * RTOL
    problems = compare(baselines, nudged)
    assert len(problems) == 1 and problems[0].startswith(f"stage2 step {row['step']} image_loss: recorded "), problems
    del nudged["stages"]["instruct"]
    nudged["stages"]["stage1"]["curve"].pop()
    lines = compare(baselines, nudged)
    assert "instruct: recorded, but this run produced no such curve" in lines
    assert any(line.startswith("stage1: steps ") for line in lines), lines
    assert RECORD_COMMAND in report(lines)
