"""The four training stages on the tiny preset and the synthetic shapes world (CPU, DeepSpeed).

Stages run in this process (DeepSpeed joins a one-process gloo group) except where a test needs
a process to die or several to cooperate: those run the `emu` console script.
"""

import dataclasses
import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from emu.config import resolve
from emu.data.sequence import SequenceBuilder, SequenceRules
from emu.data.packing import collate, pack
from emu.data.shards import iter_samples
from emu.model.config import DecoderConfig, EmuConfig
from emu.model.decoder import VisualDecoder
from emu.model.emu import IGNORE
from emu.model.io import load_model
from emu.train.config import DecoderTrainConfig, InstructConfig, Stage1Config, Stage2Config
from emu.train.stages import instruct, stage1, stage2, train_decoder

EMU = Path(sys.executable).parent / "emu"
PAIRS = ("img2dataset", "webvid")
MIXTURE = ("img2dataset", "webvid", "mmc4", "ytsb", "grit", "text")


def dirs(world: Path, names) -> list[Path]:
    return [world / n for n in names]


def tiny(cls, section: str, *overrides: str):
    return resolve(cls, section, "tiny", ["runtime.progress=false", *overrides])


def losses(out: Path, key: str = "loss") -> list[float]:
    return [json.loads(line)[key] for line in (out / "metrics.jsonl").read_text().splitlines()]


def falls(values: list[float], factor: float) -> bool:
    head, tail = sum(values[:3]) / 3, sum(values[-3:]) / 3
    return tail < factor * head


@pytest.fixture(scope="module")
def stage1_out(world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stage1")
    stage1(tiny(Stage1Config, "stage1", "steps=24"), resolve(EmuConfig, "model", "tiny"), dirs(world, PAIRS), out)
    return out


@pytest.fixture(scope="module")
def stage2_out(world, stage1_out, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stage2")
    stage2(tiny(Stage2Config, "stage2", "steps=24", f"init={stage1_out / 'model'}"), dirs(world, MIXTURE), out)
    return out


def test_stage1_captioning_loss_falls_and_exports(stage1_out):
    text = losses(stage1_out, "text_loss")
    assert falls(text, 0.7), text
    assert all(v == 0 for v in losses(stage1_out, "image_loss")), "stage 1 has no regression loss"
    record = json.loads((stage1_out / "metrics.jsonl").read_text().splitlines()[-1])
    for field in ("lr/encoder", "lr/projection", "lr/lm", "grad_norm", "samples_per_s", "tokens_per_s",
                  "padding_fraction", "tflops_per_s"):
        assert field in record
    assert (stage1_out / "tensorboard").is_dir() and (stage1_out / "stage1.config.yaml").is_file()
    model, tokenizer = load_model(stage1_out / "model")
    assert model.config.vision.image_size == 64 and len(tokenizer) > 300


def test_stage1_three_learning_rates_keep_their_ratio(stage1_out):
    first = json.loads((stage1_out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["lr/projection"] / first["lr/encoder"] == pytest.approx(1e-3 / 5e-4)
    assert first["lr/lm"] == first["lr/projection"]  # tiny preset: 1e-3 both


def test_stage2_trains_both_losses_and_keeps_the_encoder_bitwise(stage1_out, stage2_out):
    assert falls(losses(stage2_out, "text_loss"), 0.9) and falls(losses(stage2_out, "image_loss"), 0.7)
    before = load_file(str(stage1_out / "model" / "model.safetensors"))
    after = load_file(str(stage2_out / "model" / "model.safetensors"))
    visual = [k for k in before if k.startswith("visual.")]
    assert visual and all(torch.equal(before[k], after[k]) for k in visual)
    assert not torch.equal(before["project_up.weight"], after["project_up.weight"])


def test_instruct_chat_and_gen_train(world, stage2_out, tmp_path):
    chat = tmp_path / "chat"
    result = instruct(tiny(InstructConfig, "instruct", "steps=12", f"init={stage2_out / 'model'}"),
                      dirs(world, ("llava-chat", "vqav2-train", "coco-train")), chat)
    assert falls(losses(chat, "text_loss"), 0.9) and all(v == 0 for v in losses(chat, "image_loss"))
    model, _ = load_model(result.export)
    assert model.config.image_tokens_side == 4, "chat tuning reads images at the instruct pooling"
    gen = tmp_path / "gen"
    instruct(tiny(InstructConfig, "instruct_gen", "steps=12", f"init={stage2_out / 'model'}"),
             dirs(world, ("llava-edit", "img2dataset")), gen)
    assert falls(losses(gen, "image_loss"), 0.8) and all(v == 0 for v in losses(gen, "text_loss"))


def scored_runs(sequence) -> list[list[int]]:
    """The target ids of each contiguous run of supervised positions."""
    runs, current = [], []
    for target in sequence.targets:
        if target != IGNORE:
            current.append(target)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_answer_only_and_last_image_only_masks_on_real_batches(world, stage2_out):
    import random

    _, tokenizer = load_model(stage2_out / "model")
    rng = random.Random(0)
    chat = SequenceBuilder(tokenizer, SequenceRules(mode="chat", image_tokens=16, frame_tokens=4, max_len=1024))
    samples = list(iter_samples(world / "llava-chat"))[:12]
    sequences = [s for sample in samples for s in chat.build(sample, rng)]
    for sample, sequence in zip(samples, sequences):
        answers = [t.content.strip() + tokenizer.eos_token for t in sample.turns if t.role == "assistant"]
        assert [tokenizer.decode(run).strip() for run in scored_runs(sequence)] == answers
    batch = collate(pack(sequences, 1024), tokenizer.pad_token_id)
    assert int((batch.targets != IGNORE).sum()) == sum(len(r) for s in sequences for r in scored_runs(s))
    assert not batch.image_regress.any()

    gen = SequenceBuilder(tokenizer, SequenceRules(mode="gen", image_tokens=4, frame_tokens=4, max_len=1024))
    sequences = [s for sample in list(iter_samples(world / "llava-edit"))[:8] for s in gen.build(sample, rng)]
    for seq in sequences:
        assert [v.regress for v in seq.visuals] == [False] * (len(seq.visuals) - 1) + [True]
        assert seq.visuals[-1].index == len(seq.visuals) - 1 or seq.visuals[-1].regress
        assert all(t == IGNORE for t in seq.targets)
    batch = collate(pack(sequences, 1024), tokenizer.pad_token_id)
    assert int(batch.image_regress.sum()) == len(sequences)


def test_decoder_trains_with_frozen_vae(world, stage1_out, tmp_path):
    out = tmp_path / "decoder"
    # Cross-attention only: through a random frozen VAE, 16 steps of the spatially conditioned UNet
    # start near their floor (v-prediction reads the grid at once), so the fall is lost in noise.
    architecture = dataclasses.replace(resolve(DecoderConfig, "visual_decoder", "tiny"), spatial_condition=False)
    initial = VisualDecoder.from_config(architecture)
    initial.save_pretrained(tmp_path / "init")
    config = tiny(DecoderTrainConfig, "decoder", "steps=16", f"encoder={stage1_out / 'model'}",
                  f"init={tmp_path / 'init'}")
    result = train_decoder(config, architecture, dirs(world, ("img2dataset",)), out)
    assert falls(losses(out), 0.6)
    trained = VisualDecoder.from_pretrained(result.export)
    for key, value in initial.vae.state_dict().items():
        assert torch.equal(trained.vae.state_dict()[key], value), key
    assert not all(torch.equal(trained.unet.state_dict()[k], v) for k, v in initial.unet.state_dict().items())


DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def clean_env() -> dict[str, str]:
    """This process joined its own one-process group (in-process stages); children start fresh."""
    return {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}


def run_emu(*args: str) -> subprocess.Popen:
    return subprocess.Popen([str(EMU), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=clean_env())


def stage2_args(world: Path, init: Path, out: Path, *overrides: str) -> list[str]:
    data = [arg for name in ("img2dataset", "grit", "text") for arg in ("--data", str(world / name))]
    return ["train", "stage2", *data, "--init", str(init), "--out", str(out), "--preset", "tiny",
            "runtime.progress=false", "steps=8", "batch_sizes={image_text: 4, grounded: 2, text: 1}",
            "runtime.checkpoint_every=3", *overrides]


def wait_for_checkpoint(out: Path, tag: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    pointer = out / "checkpoints" / "latest"
    while time.monotonic() < deadline:
        if pointer.is_file() and pointer.read_text().strip() >= tag:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {tag}: {proc.stdout.read()}")
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint {tag} in {timeout} s")


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out = load_file(str(folder / "model.safetensors"))
    for shard in sorted((folder / "lm").glob("*.safetensors")):
        out.update({f"lm.{k}": v for k, v in load_file(str(shard)).items()})
    return out


def test_resume_after_sigkill_equals_an_uninterrupted_run(world, stage1_out, tmp_path):
    init = stage1_out / "model"
    straight = run_emu(*stage2_args(world, init, tmp_path / "straight"))
    assert straight.wait(timeout=300) == 0, straight.stdout.read()
    killed = run_emu(*stage2_args(world, init, tmp_path / "killed"))
    wait_for_checkpoint(tmp_path / "killed", "step-00000003", killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "model").exists(), "killed before the end"
    resumed = run_emu(*stage2_args(world, init, tmp_path / "killed"))
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert json.loads((tmp_path / "killed" / "summary.json").read_text())["resumed_from"] >= 3
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [json.loads(line)["step"] for line in (tmp_path / "straight" / "metrics.jsonl").read_text()
                     .splitlines()], "each step once: the steps trained again after the resume are not repeated"
    a, b = weights(tmp_path / "straight" / "model"), weights(tmp_path / "killed" / "model")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"resumed weights differ (tolerance 0, CPU fp32): {different[:5]}"


def wait_for_lines(path: Path, lines: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file() or len(path.read_text().splitlines()) < lines:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.stdout.read()}")
        assert time.monotonic() < deadline, f"{path} did not reach {lines} lines"
        time.sleep(0.05)


def test_sigterm_writes_a_checkpoint_and_exits_143(world, stage1_out, tmp_path):
    """A preempted pod gets SIGTERM: the step in flight finishes, a checkpoint is written, exit 143;
    the next run resumes from it."""
    out = tmp_path / "preempted"
    args = stage2_args(world, stage1_out / "model", out, "steps=400", "runtime.checkpoint_every=1000")
    proc = run_emu(*args)
    wait_for_lines(out / "metrics.jsonl", 2, proc)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, output
    assert "stopped by SIGTERM" in output
    tag = (out / "checkpoints" / "latest").read_text().strip()
    done = int(tag[len("step-"):])
    assert 2 <= done < 400 and len((out / "metrics.jsonl").read_text().splitlines()) == done
    again = run_emu(*args)
    wait_for_lines(out / "metrics.jsonl", done + 1, again)
    again.send_signal(signal.SIGTERM)
    output = again.communicate(timeout=120)[0]
    assert again.returncode == 143 and f"resumed from {tag}" in output, output
    first_resumed = json.loads((out / "metrics.jsonl").read_text().splitlines()[done])
    assert first_resumed["step"] == done + 1


def test_two_processes_zero2_train_and_checkpoint(world, stage1_out, tmp_path):
    out = tmp_path / "zero2"
    args = stage2_args(world, stage1_out / "model", out, "runtime.zero_stage=2", "steps=4")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--standalone", "-m", "emu.cli", *args], capture_output=True, text=True, timeout=600,
                          env=clean_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tag = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert {p.name for p in tag.glob("*optim_states.pt")} == {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    assert {p.name for p in tag.glob("trainer-rank*.json")} == {"trainer-rank0.json", "trainer-rank1.json"}
    assert (out / "model" / "emu.json").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(r["samples_per_s"] > 0 for r in records)


def test_missing_init_is_a_one_line_error(world, tmp_path):
    proc = run_emu("train", "stage2", "--data", str(world / "text"), "--out", str(tmp_path / "o"),
                   "--preset", "tiny", "batch_sizes={text: 1}")
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 2 and "stage2.init must name the previous stage's model" in output


def test_a_non_finite_loss_stops_training_with_a_clear_error(world, stage1_out, tmp_path):
    """lr=1e308: the first update blows the weights up, the second step's loss is not finite;
    with nonfinite_patience=1 one such step is tolerated, the next stops the stage (exit 2, one
    line), with no model exported and no checkpoint of the diverged weights."""
    out = tmp_path / "diverged"
    proc = run_emu(*stage2_args(world, stage1_out / "model", out, "lr=1e308", "runtime.nonfinite_patience=1",
                                "runtime.checkpoint_every=0"))
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 2, output
    (line,) = [line for line in output.splitlines() if line.startswith("error: ")]
    assert re.search(r"stage2: the loss is (nan|inf) at step 3 \(2 non-finite step\(s\) in a row; "
                     r"stage2.runtime.nonfinite_patience=1\)", line), line
    assert "Traceback" not in output
    assert not (out / "model").exists() and not (out / "checkpoints" / "latest").exists()


def test_an_absurd_batch_size_is_refused_before_anything_is_allocated(world, tmp_path):
    proc = run_emu("train", "stage1", "--data", str(world / "img2dataset"), "--out", str(tmp_path / "o"),
                   "--preset", "tiny", "batch_sizes={image_text: 1000000000000}")
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 2, output
    assert re.search(r"^error: stage1: one step of stage1.batch_sizes \(image_text=1000000000000\) at "
                     r"stage1.image_size=\d+ needs at least [\d,.]+ GiB for its samples alone", output, re.M), output
    assert "Traceback" not in output


def test_frozen_module_asked_to_train_is_refused_before_training():
    with pytest.raises(Exception, match="stage2.trainable lists 'visual', but stage2 keeps it frozen"):
        resolve(Stage2Config, "stage2", "tiny", ["trainable=[visual, lm]"])


def test_stage1_raises_the_resolution_mid_schedule(world, tmp_path):
    """Emu2 trains stage 1 at 224 px, then restarts at 448 px; here 64 -> 128 px at step 4."""
    out = tmp_path / "resize"
    config = tiny(Stage1Config, "stage1", "steps=6", "resolution_schedule=[[4, 128]]",
                  "schedule={decay: linear, warmup_steps: 2}")
    stage1(config, resolve(EmuConfig, "model", "tiny"), dirs(world, PAIRS), out)
    model, _ = load_model(out / "model")
    assert model.config.vision.image_size == 128 and model.visual.pos_embed.shape[1] == 16 * 16 + 1
    lrs = [json.loads(line)["lr/lm"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    peak = 1e-3
    assert lrs[0] == pytest.approx(peak / 2) and lrs[4] == pytest.approx(peak / 2), "warmup restarts at the resize"
    assert lrs[3] == pytest.approx(0.0)
