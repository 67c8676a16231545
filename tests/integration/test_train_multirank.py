"""Training on several gloo ranks under torchrun (CPU), as a job on 8 GPUs would run it.

The data is chosen so that ranks disagree: per step, rank shares differ in size and type (one rank
gets images, another only text, with 4 ranks one gets nothing at all), and with packing off and
one row per micro-batch their micro-batch counts differ. ZeRO-3 runs with every parameter
partitioned (`runtime.zero3_persistence_threshold=0`), so every gather must line up. Each
multi-rank run must then compute what one rank computes on the same global batch: the same
losses, the same FLOPs and the same final weights (fp32; only the order of floating-point sums
differs), and a 2-rank run killed with SIGKILL and resumed must equal the uninterrupted one.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from emu.config import resolve
from emu.model.config import EmuConfig
from emu.train.config import Stage1Config, Stage2Config
from emu.train.stages import stage1, stage2
from tests.integration.test_train_stages import clean_env, weights

STAGE2_DATA = ("img2dataset", "grit", "text")
# Per step, 3 pairs + 1 grounded + 1 text over the ranks: with 2 ranks one holds 3 or 4 samples and
# the other 1 or 2 (sometimes only text), with 4 ranks one holds none at some steps.
STAGE2_SETTINGS = ("batch_sizes={image_text: 3, grounded: 1, text: 1}", "steps=12", "sequence.packing=false",
                   "runtime.micro_batch_size=1", "runtime.checkpoint_every=3", "runtime.progress=false",
                   "runtime.zero3_persistence_threshold=0", "runtime.peak_tflops=1")
TIMEOUT = 300


def stage2_args(world: Path, init: Path, out: Path, *overrides: str) -> list[str]:
    data = [arg for name in STAGE2_DATA for arg in ("--data", str(world / name))]
    return ["train", "stage2", *data, "--init", str(init), "--out", str(out), "--preset", "tiny",
            *STAGE2_SETTINGS, *overrides]


def torchrun(ranks: int, args: list[str], **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
                             "--standalone", "-m", "emu.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=clean_env(), **popen)


def run_ranks(ranks: int, args: list[str]) -> str:
    proc = torchrun(ranks, args)
    try:
        output = proc.communicate(timeout=TIMEOUT)[0]
    except subprocess.TimeoutExpired:  # ranks out of step wait in a collective forever
        proc.kill()
        raise AssertionError(f"{ranks} ranks did not finish in {TIMEOUT} s: {proc.communicate()[0][-4000:]}")
    assert proc.returncode == 0, output[-6000:]
    return output


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts its ranks in sessions of their own)."""
    import psutil

    root = psutil.Process(pid)
    for process in [*root.children(recursive=True), root]:
        process.send_signal(signal.SIGKILL)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_training(reference: Path, other: Path, atol: float = 2e-5) -> None:
    """Same losses, FLOPs and final weights as the reference, up to the order of float sums."""
    a, b = records(reference), records(other)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for key in ("loss", "text_loss", "image_loss", "step_tflops", "text_targets", "image_targets", "grad_norm"):
        torch.testing.assert_close(torch.tensor([r[key] for r in b], dtype=torch.float64),
                                   torch.tensor([r[key] for r in a], dtype=torch.float64),
                                   rtol=1e-5, atol=1e-7, msg=lambda m: f"{key}: {m}")
    wa, wb = weights(reference / "model"), weights(other / "model")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-4, atol=atol, msg=lambda m: f"{key}: {m}")


@pytest.fixture(scope="module")
def one_rank(world, init_model, tmp_path_factory) -> Path:
    """The reference: the same global batches on one rank, ZeRO 0, in this process."""
    out = tmp_path_factory.mktemp("one-rank")
    overrides = [a for a in STAGE2_SETTINGS] + [f"init={init_model}"]
    stage2(resolve(Stage2Config, "stage2", "tiny", overrides), [world / n for n in STAGE2_DATA], out)
    return out


@pytest.fixture(scope="module")
def zero3_two_ranks(world, init_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zero3-2")
    run_ranks(2, stage2_args(world, init_model, out, "runtime.zero_stage=3"))
    return out


def test_the_data_really_differs_between_ranks(zero3_two_ranks):
    """The premise of the other tests: micro-batch counts differ, so one rank ran blank ones."""
    blanks = [r["blank_micro_batches"] for r in records(zero3_two_ranks)]
    micro = [r["micro_batches"] for r in records(zero3_two_ranks)]
    assert all(m >= 3 for m in micro) and any(b > 0 for b in blanks), (micro, blanks)


def test_zero3_on_two_ranks_equals_one_rank(one_rank, zero3_two_ranks):
    assert_same_training(one_rank, zero3_two_ranks)


def test_zero3_flops_count_the_whole_model(one_rank, zero3_two_ranks):
    """MFU's numerator is the model's FLOPs, whatever ZeRO-3 keeps on each rank: equal to ZeRO 0's
    on one rank (before, partitioned parameters counted as 0)."""
    a, b = records(one_rank), records(zero3_two_ranks)
    assert all(r["step_tflops"] > 0 for r in a)
    assert [r["step_tflops"] for r in b] == pytest.approx([r["step_tflops"] for r in a], rel=1e-9)
    assert all("mfu" in r for r in b)


def test_zero3_packed_checkpointed_with_loader_workers_equals_one_rank(world, init_model, tmp_path):
    """The other paths at once on 2 ranks: packed rows (differently packed on each rank), two rows
    per micro-batch, gradient checkpointing under ZeRO-3, inputs from loader workers."""
    settings = ("sequence.packing=true", "runtime.micro_batch_size=2", "runtime.gradient_checkpointing=true",
                "steps=4", "batch_sizes={image_text: 5, video_text: 1, grounded: 1, text: 2}")
    data = ("img2dataset", "webvid", "grit", "text")
    reference = tmp_path / "one"
    overrides = [*STAGE2_SETTINGS, *settings, f"init={init_model}"]
    stage2(resolve(Stage2Config, "stage2", "tiny", overrides), [world / n for n in data], reference)
    out = tmp_path / "two"
    args = ["train", "stage2", *[a for n in data for a in ("--data", str(world / n))], "--init", str(init_model),
            "--out", str(out), "--preset", "tiny", *STAGE2_SETTINGS, *settings, "runtime.zero_stage=3",
            "runtime.loader_workers=2"]
    run_ranks(2, args)
    assert_same_training(reference, out)


def test_zero0_on_two_ranks_equals_one_rank(world, init_model, one_rank, tmp_path):
    out = tmp_path / "zero0-2"
    run_ranks(2, stage2_args(world, init_model, out, "runtime.zero_stage=0"))
    assert_same_training(one_rank, out)
    # ZeRO 0 logs the norm of the all-reduced gradient, as ZeRO 3 does: the same on every rank count.
    torch.testing.assert_close(torch.tensor([r["grad_norm"] for r in records(out)]),
                               torch.tensor([r["grad_norm"] for r in records(one_rank)]), rtol=1e-4, atol=1e-6)


def test_zero2_on_four_ranks_with_an_empty_rank_equals_one_rank(world, init_model, one_rank, tmp_path):
    out = tmp_path / "zero2-4"
    run_ranks(4, stage2_args(world, init_model, out, "runtime.zero_stage=2"))
    assert_same_training(one_rank, out)
    assert any(r["blank_micro_batches"] >= 3 for r in records(out))


@pytest.mark.slow
@pytest.mark.parametrize("zero", [1, 2])
def test_zero1_and_zero2_on_two_ranks_equal_one_rank(world, init_model, one_rank, tmp_path, zero):
    out = tmp_path / f"zero{zero}-2"
    run_ranks(2, stage2_args(world, init_model, out, f"runtime.zero_stage={zero}"))
    assert_same_training(one_rank, out)


@pytest.mark.slow
def test_zero3_on_four_ranks_equals_one_rank(world, init_model, one_rank, tmp_path):
    out = tmp_path / "zero3-4"
    run_ranks(4, stage2_args(world, init_model, out, "runtime.zero_stage=3"))
    assert_same_training(one_rank, out)


def test_two_ranks_killed_and_resumed_equal_the_uninterrupted_run(world, init_model, zero3_two_ranks, tmp_path):
    out = tmp_path / "killed"
    proc = torchrun(2, stage2_args(world, init_model, out, "runtime.zero_stage=3"))
    pointer = out / "checkpoints" / "latest"
    deadline = time.monotonic() + TIMEOUT
    while not (pointer.is_file() and pointer.read_text().strip() >= "step-00000003"):
        assert proc.poll() is None, f"the run ended before its first checkpoint: {proc.stdout.read()[-4000:]}"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.05)
    kill_tree(proc.pid)  # torchrun's agent and both ranks at once, mid-step
    proc.wait()
    tag = pointer.read_text().strip()
    assert tag < "step-00000012" and not (out / "model").exists(), "killed before the end"
    output = run_ranks(2, stage2_args(world, init_model, out, "runtime.zero_stage=3"))
    assert f"resumed from {tag}" in output
    a, b = weights(zero3_two_ranks / "model"), weights(out / "model")
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"resumed weights differ (tolerance 0, CPU fp32): {different[:5]}"
    done = int(tag[len("step-"):])
    losses = {r["step"]: r["loss"] for r in records(out) if r["step"] > done}
    assert losses == {r["step"]: r["loss"] for r in records(zero3_two_ranks) if r["step"] > done}


STAGE1_SETTINGS = ("batch_sizes={image_text: 3, video_text: 1}", "steps=3", "sequence.packing=false",
                   "runtime.micro_batch_size=1", "runtime.progress=false", "runtime.zero3_persistence_threshold=0")


@pytest.fixture(scope="module")
def stage1_one_rank(world, init_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stage1-one")
    stage1(resolve(Stage1Config, "stage1", "tiny", [*STAGE1_SETTINGS, f"init={init_model}"]),
           resolve(EmuConfig, "model", "tiny"), [world / "img2dataset", world / "webvid"], out)
    return out


@pytest.mark.parametrize("ranks, zero", [(2, 2), pytest.param(4, 3, marks=pytest.mark.slow)])
def test_stage1_on_several_ranks_equals_one_rank(world, init_model, stage1_one_rank, tmp_path, ranks, zero):
    """Stage 1 trains the encoder: a rank's blank micro-batch still runs it (on a blank image), its
    output reaching the LM with weight 0, so ZeRO-2's reductions and ZeRO-3's gathers in backward
    line up; the result equals one rank's."""
    out = tmp_path / "several"
    data = [a for n in ("img2dataset", "webvid") for a in ("--data", str(world / n))]
    run_ranks(ranks, ["train", "stage1", *data, "--out", str(out), "--preset", "tiny", *STAGE1_SETTINGS,
                      f"init={init_model}", f"runtime.zero_stage={zero}"])
    assert any(r["blank_micro_batches"] > 0 for r in records(out))
    assert_same_training(stage1_one_rank, out)


def test_bf16_zero3_on_two_ranks_tracks_one_rank(world, init_model, tmp_path):
    """The production setting (bf16, ZeRO-3, gradients accumulated in fp32) on 2 ranks follows the
    1-rank bf16 run on the same global batches, to bf16's precision."""
    bf16 = ("runtime.precision=bf16", "steps=4")
    reference = tmp_path / "one"
    stage2(resolve(Stage2Config, "stage2", "tiny", [*STAGE2_SETTINGS, *bf16, "runtime.zero_stage=2",
                                                    f"init={init_model}"]), [world / n for n in STAGE2_DATA], reference)
    out = tmp_path / "two"
    run_ranks(2, stage2_args(world, init_model, out, *bf16, "runtime.zero_stage=3"))
    a, b = records(reference), records(out)
    assert [r["text_targets"] for r in a] == [r["text_targets"] for r in b]
    torch.testing.assert_close(torch.tensor([r["loss"] for r in b]), torch.tensor([r["loss"] for r in a]),
                               rtol=2e-2, atol=0.0)
    assert weights(out / "model")["project_up.weight"].dtype == torch.bfloat16
