"""Steps prepared by data loader workers (emu.train.loader) train exactly as steps prepared in the
training process, and resume exactly after a SIGKILL, however far ahead the workers had read."""

import json
import signal

import pytest
import torch

from emu.errors import DatasetError
from emu.train.loader import StepLoader
from tests.integration.test_train_stages import (run_emu, stage1_out, stage2_args, wait_for_checkpoint,  # noqa: F401
                                                 weights)


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_worker_steps_equal_inline_steps(world, stage1_out, tmp_path):
    runs = {}
    for workers in (0, 2):
        out = tmp_path / f"workers{workers}"
        proc = run_emu(*stage2_args(world, stage1_out / "model", out, f"runtime.loader_workers={workers}",
                                    "runtime.loader_prefetch=3"))
        assert proc.wait(timeout=300) == 0, proc.stdout.read()
        runs[workers] = out
    inline, loaded = records(runs[0]), records(runs[2])
    assert [r["loss"] for r in loaded] == [r["loss"] for r in inline]
    assert all(0 <= r["loader_wait_fraction"] <= 1 for r in loaded)
    a, b = weights(runs[0] / "model"), weights(runs[2] / "model")
    assert not [k for k in a if not torch.equal(a[k], b[k])]


def test_killed_with_workers_ahead_resumes_exactly(world, stage1_out, tmp_path):
    init = stage1_out / "model"
    workers = ("runtime.loader_workers=2", "runtime.loader_prefetch=4")  # up to 8 steps read ahead
    straight = run_emu(*stage2_args(world, init, tmp_path / "straight"))
    assert straight.wait(timeout=300) == 0, straight.stdout.read()
    killed = run_emu(*stage2_args(world, init, tmp_path / "killed", *workers))
    wait_for_checkpoint(tmp_path / "killed", "step-00000003", killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "model").exists(), "killed before the end"
    resumed = run_emu(*stage2_args(world, init, tmp_path / "killed", *workers))
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert "resumed from step-0000000" in output
    a, b = weights(tmp_path / "straight" / "model"), weights(tmp_path / "killed" / "model")
    assert not [k for k in a if not torch.equal(a[k], b[k])], "resumed weights differ (tolerance 0, CPU fp32)"


class Counting:
    """A stand-in Mixture: sample i of step s is s * 10 + i (positions only, like the real one)."""

    def __init__(self):
        self.step = 0

    def next_batch(self):
        batch = [self.step * 10 + i for i in range(3)]
        self.step += 1
        return batch

    def advance(self, steps=1):
        self.step += steps


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_steps_arrive_in_order_from_the_start_step(workers):
    data = Counting()
    data.advance(5)  # resumed at step 5
    got = list(StepLoader(data, lambda samples, step: (step, samples), 5, 12, workers=workers))
    assert [s for s, _ in got] == list(range(5, 12))
    assert all(prepared == (s, [s * 10, s * 10 + 1, s * 10 + 2]) for s, prepared in got)
    assert data.step == 12  # the training process's position follows the steps taken


def test_a_worker_error_reaches_the_training_process_with_its_message():
    def prepare(samples, step):
        if step == 2:
            raise DatasetError("shard-000001.tar key 'x': image_undecodable")
        return samples

    with pytest.raises(DatasetError, match="shard-000001.tar key 'x': image_undecodable") as info:
        list(StepLoader(Counting(), prepare, 0, 5, workers=2))
    assert "raised in a data loader worker" in "".join(info.value.__notes__)
