"""The visual-decoder stage (Emu2 §2.2.3) on the tiny preset (CPU, DeepSpeed in this process):
precomputed latents against online encoding, micro-batched encoding, frozen modules, gradient
checkpointing, and the zero-weight micro-batches that keep ranks in step."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import emu.precompute.encoder as encoder_mod
import emu.train.decoder_step as decoder_step
from emu.config import resolve
from emu.data.formats import ImportConfig
from emu.data.prepare import import_sources
from emu.data.schema import Pair
from emu.data.shards import ShardWriter, iter_samples
from emu.data.synth import SynthConfig, generate
from emu.data.tokenizer import train_tokenizer
from emu.errors import ConfigError
from emu.model.config import DecoderConfig, EmuConfig
from emu.model.decoder import VisualDecoder
from emu.model.emu import EmuModel
from emu.model.io import save_model
from emu.precompute.config import PrecomputeConfig
from emu.precompute.job import run_precompute
from emu.train.config import DecoderTrainConfig
from emu.train.stages import train_decoder


def png(seed: int, size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    """The synthetic shapes pairs, plus a few wide and tall images (so the center crop really
    scales and cuts), a random tiny Emu model as the frozen encoder, and a random tiny decoder."""
    root = tmp_path_factory.mktemp("decoder-world")
    generate(root / "raw", resolve(SynthConfig, "synth", "tiny"))
    import_sources(root / "raw", root / "shards", resolve(ImportConfig, "import", "tiny"))
    with ShardWriter(root / "shards" / "odd-sizes", "test") as writer:
        for i, size in enumerate([(96, 64), (64, 80), (120, 72), (70, 100)] * 2):
            writer.write(Pair(key=f"odd{i}", images=[png(i, size)], text=f"an odd picture {i}"))
        writer.close()
    torch.manual_seed(0)
    tokenizer = train_tokenizer([f"a picture of thing {i}" for i in range(40)], vocab_size=300)
    save_model(EmuModel.build(resolve(EmuConfig, "model", "tiny"), tokenizer), tokenizer, root / "encoder")
    architecture = resolve(DecoderConfig, "visual_decoder", "tiny")
    VisualDecoder.from_config(architecture).save_pretrained(root / "init")
    return SimpleNamespace(root=root, data=[root / "shards" / "img2dataset", root / "shards" / "odd-sizes"],
                           odd=[root / "shards" / "odd-sizes"], encoder=root / "encoder", init=root / "init",
                           architecture=architecture)


@pytest.fixture(scope="module")
def store(world) -> Path:
    """`emu precompute` with latents (a local Ray, started and stopped by the job)."""
    out = world.root / "precomputed"
    config = resolve(PrecomputeConfig, "precompute", "tiny", ["latents=true", f"decoder={world.init}"])
    run_precompute(world.data, str(world.encoder), out, config)
    return out


def decoder_config(world, *overrides: str) -> DecoderTrainConfig:
    return resolve(DecoderTrainConfig, "decoder", "tiny",
                   ["runtime.progress=false", f"encoder={world.encoder}", f"init={world.init}", *overrides])


def losses(out: Path, key: str = "loss") -> list[float]:
    return [json.loads(line)[key] for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---- precomputed latents ------------------------------------------------------------------------

def test_precomputed_latents_give_the_losses_of_online_encoding(world, store, tmp_path, monkeypatch):
    # On the wide and tall images (a batch of 8 is all of them): crops that really scale and cut,
    # time ids that differ per image.
    online = tmp_path / "online"
    train_decoder(decoder_config(world, "steps=3", "augment=false"), world.architecture, world.odd, online)

    def never(*args, **kwargs):
        raise AssertionError("a precomputed run must not encode")

    with monkeypatch.context() as patch:  # the store alone provides latents and conditions
        patch.setattr(VisualDecoder, "encode_latents", never)
        patch.setattr(encoder_mod.Encoder, "encode", never)
        stored = tmp_path / "stored"
        train_decoder(decoder_config(world, "steps=3", "augment=false", f"precomputed={store}"),
                      world.architecture, world.odd, stored)
    # Equal up to float rounding (the precompute encoded in batches of another size). The weights
    # are not compared: Adam turns rounding-level differences of near-zero gradients into
    # lr-sized steps, whatever the inputs' agreement.
    torch.testing.assert_close(losses(stored), losses(online), rtol=1e-5, atol=0.0)
    torch.testing.assert_close(losses(stored, "grad_norm"), losses(online, "grad_norm"), rtol=1e-5, atol=0.0)

    augmented = tmp_path / "augmented"  # the comparison is not vacuous: other crops, other losses
    train_decoder(decoder_config(world, "steps=3"), world.architecture, world.odd, augmented)
    assert all(abs(a - b) > 1e-4 for a, b in zip(losses(augmented), losses(online)))


def test_a_precompute_that_does_not_fit_is_refused(world, store, tmp_path):
    with pytest.raises(ConfigError, match="decoder.augment must be false with decoder.precomputed"):
        decoder_config(world, f"precomputed={store}")

    no_latents = tmp_path / "no-latents"
    shutil.copytree(store, no_latents)
    summary = json.loads((no_latents / "precompute.json").read_text())
    (no_latents / "precompute.json").write_text(json.dumps({**summary, "latents": None}))
    with pytest.raises(ConfigError, match="decoder.precomputed: .* holds no latents"):
        train_decoder(decoder_config(world, "augment=false", f"precomputed={no_latents}"), world.architecture,
                      world.data, tmp_path / "a")

    torch.manual_seed(1)  # another VAE: its latents are not the store's
    VisualDecoder.from_config(world.architecture).save_pretrained(tmp_path / "other-decoder")
    with pytest.raises(ConfigError, match="decoder.precomputed: .* different VAE"):
        train_decoder(decoder_config(world, "augment=false", f"precomputed={store}",
                                     f"init={tmp_path / 'other-decoder'}"),
                      world.architecture, world.data, tmp_path / "b")

    torch.manual_seed(2)  # another encoder: its embeddings are not the store's
    tokenizer = train_tokenizer(["another encoder"] * 10, vocab_size=300)
    save_model(EmuModel.build(resolve(EmuConfig, "model", "tiny"), tokenizer), tokenizer, tmp_path / "other-encoder")
    with pytest.raises(ConfigError, match="decoder.precomputed: .* different encoder"):
        train_decoder(decoder_config(world, "augment=false", f"precomputed={store}",
                                     f"encoder={tmp_path / 'other-encoder'}"),
                      world.architecture, world.data, tmp_path / "c")


# ---- modes, gradients, checkpointing, micro-batches ---------------------------------------------

def probed_run(world, out: Path, *overrides: str) -> SimpleNamespace:
    """One decoder step of 8 samples in micro-batches of 4, with hooks on the modules the stage
    builds: what each frozen module saw (batch sizes, train/eval mode, autograd) and how often two
    UNet residual blocks ran."""
    seen = SimpleNamespace(encoder=[], vae=[], unet_training=[], down=0, up=0, encoder_module=None, decoder=None)
    load_encoder, from_pretrained = encoder_mod.load_encoder, VisualDecoder.from_pretrained

    def frozen_probe(name: str, root: torch.nn.Module):
        def hook(module, args):
            getattr(seen, name).append(SimpleNamespace(batch=args[0].shape[0], dtype=args[0].dtype,
                                                       training=any(m.training for m in root.modules()),
                                                       grad=torch.is_grad_enabled()))
        return hook

    def capture_encoder(*args, **kwargs):
        encoder = load_encoder(*args, **kwargs)
        encoder.visual.register_forward_pre_hook(frozen_probe("encoder", encoder.visual))
        seen.encoder_module = encoder
        return encoder

    def capture_decoder(*args, **kwargs):
        decoder = from_pretrained(*args, **kwargs)
        decoder.vae.encoder.register_forward_pre_hook(frozen_probe("vae", decoder.vae))
        decoder.unet.register_forward_pre_hook(lambda module, args: seen.unet_training.append(module.training))

        def count(name: str):
            def hook(module, args):
                setattr(seen, name, getattr(seen, name) + 1)
            return hook

        # Pre-hooks: torch's non-reentrant checkpoint stops a recomputation as soon as it has
        # rebuilt the saved tensors, before a forward hook would run.
        decoder.unet.down_blocks[0].resnets[0].register_forward_pre_hook(count("down"))
        decoder.unet.up_blocks[-1].resnets[0].register_forward_pre_hook(count("up"))
        seen.decoder = decoder
        return decoder

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(encoder_mod, "load_encoder", capture_encoder)
        patch.setattr(VisualDecoder, "from_pretrained", capture_decoder)
        train_decoder(decoder_config(world, "steps=1", "runtime.micro_batch_size=4", *overrides),
                      world.architecture, world.data, out)
    return seen


@pytest.fixture(scope="module")
def probed(world, tmp_path_factory) -> dict[bool, SimpleNamespace]:
    """The same step without and with runtime.gradient_checkpointing; the second in bf16 under
    ZeRO-2, as the larger presets train."""
    plain = probed_run(world, tmp_path_factory.mktemp("probe-plain"), "runtime.gradient_checkpointing=false")
    checkpointed = probed_run(world, tmp_path_factory.mktemp("probe-checkpointed"),
                              "runtime.gradient_checkpointing=true", "runtime.precision=bf16", "runtime.zero_stage=2")
    return {False: plain, True: checkpointed}


def test_gradient_checkpointing_recomputes_the_unet_blocks(probed):
    # Two micro-batches: each block runs once per forward, and once more in the backward when
    # its activations were not kept (diffusers' checkpointing recomputes them).
    assert (probed[False].down, probed[False].up) == (2, 2)
    assert (probed[True].down, probed[True].up) == (4, 4)


def test_frozen_modules_run_in_eval_mode_without_gradients(probed):
    for run in probed.values():
        # Online encoding runs in micro-batches (4 + 4), never the rank's 8 samples at once.
        assert [c.batch for c in run.encoder] == [4, 4] and [c.batch for c in run.vae] == [4, 4]
        assert not any(c.training for c in run.encoder + run.vae), "a frozen module is in train mode"
        assert not any(c.grad for c in run.encoder + run.vae), "a frozen module ran under autograd"
        assert run.unet_training and all(run.unet_training), "the UNet must train in train mode"
        # The encoder runs in the runtime precision, as the UNet (DeepSpeed casts only the decoder).
        unet_dtype = next(run.decoder.unet.parameters()).dtype
        assert {c.dtype for c in run.encoder} == {unet_dtype}
        frozen = [*run.decoder.vae.parameters(), *run.encoder_module.visual.parameters()]
        assert not any(p.requires_grad or p.grad is not None for p in frozen), "a frozen module got gradients"
    assert next(probed[True].decoder.unet.parameters()).dtype == torch.bfloat16


# ---- ranks in step ------------------------------------------------------------------------------

def test_a_rank_with_fewer_micro_batches_pads_with_zero_weight_passes(world, monkeypatch):
    """Rank 0 of 2 holds 3 samples (3 micro-batches of 1), the other rank 4: rank 0 runs a 4th
    micro-batch of weight 0 through the UNet, forward and backward. A rank with no sample at all
    still runs one that reaches every UNet parameter (ZeRO reduces each parameter's gradient)."""
    torch.manual_seed(0)
    decoder = VisualDecoder.from_config(world.architecture)
    encoder = encoder_mod.load_encoder(world.encoder, 64)
    backward = []

    def record(loss):
        backward.append(float(loss.detach()))
        loss.backward()

    engine = SimpleNamespace(engine=decoder, backward=record, device=torch.device("cpu"))
    config = decoder_config(world, "runtime.micro_batch_size=1")
    others = {"samples": 4, "micro": 4}

    def two_ranks(values, device=None):
        """The sums rank 1 would contribute to: [samples, micro-batches of rank 0, of rank 1], then
        [loss sum, conditions dropped] (rank 1's taken equal to rank 0's)."""
        if len(values) == 3:
            return [values[0] + others["samples"], values[1], others["micro"]]
        return [v * 2 for v in values]

    monkeypatch.setattr(decoder_step, "all_reduce_sum", two_ranks)
    step = decoder_step.DecoderStep(engine=engine, decoder=decoder, config=config, rank=0, world=2, encoder=encoder)
    samples = list(iter_samples(world.data[0]))[:3]
    step(samples, 0)
    assert len(backward) == 4 and backward[-1] == 0.0 and all(v > 0 for v in backward[:3])

    decoder.zero_grad(set_to_none=True)
    backward.clear()
    others.update(samples=1, micro=1)
    step([], 1)
    assert backward == [0.0]
    assert all(p.grad is not None for p in decoder.unet.parameters()), "padding must reach every UNet parameter"


def test_two_ranks_with_uneven_batches_train_under_zero2(world, tmp_path):
    """3 samples on 2 ranks in micro-batches of 1: at every step one rank runs two micro-batches,
    the other one and a padding one. Without the padding the ranks' gradient reductions do not
    line up and the run hangs."""
    from tests.integration.test_train_stages import clean_env

    out = tmp_path / "two"
    args = ["train", "decoder", *[arg for d in world.data for arg in ("--data", str(d))],
            "--encoder", str(world.encoder), "--out", str(out), "--preset", "tiny", f"init={world.init}",
            "runtime.progress=false", "steps=3", "batch_sizes={image_text: 3}", "runtime.micro_batch_size=1",
            "runtime.zero_stage=2"]
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                             "-m", "emu.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=clean_env(), start_new_session=True)
    try:
        output = proc.communicate(timeout=240)[0]
    except subprocess.TimeoutExpired:  # ranks whose micro-batches do not line up wait in a collective
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the two ranks did not finish in 240 s:\n" + proc.communicate()[0][-3000:])
    assert proc.returncode == 0, output[-3000:]
    assert len(losses(out)) == 3 and (out / "decoder" / "unet").is_dir()


# ---- a decoder from scratch: its VAE first ----------------------------------------------------

def _vae_l1(decoder: VisualDecoder, pixels: torch.Tensor) -> float:
    with torch.no_grad():
        latents = decoder.vae.encode(pixels).latent_dist.mode()
        return float((decoder.vae.decode(latents).sample - pixels).abs().mean())


def test_a_decoder_from_scratch_trains_its_vae_first_then_freezes_it(world, tmp_path):
    """No decoder.init: the stage trains the VAE (out/vae/, its own metrics and checkpoints), sets
    the latent scaling factor from it, and trains the UNet on its frozen latents; the export holds
    that VAE. A second call resumes both phases from their final checkpoints and trains nothing."""
    from emu.precompute.encoder import center_crop, unit_range
    from emu.train.decoder_step import target

    config = decoder_config(world, "init=", "steps=2", "vae_steps=12", "vae_lr=2e-3")
    torch.manual_seed(0)
    random_vae = VisualDecoder.from_config(world.architecture)
    result = train_decoder(config, world.architecture, world.data, tmp_path / "out")

    vae_curve = losses(tmp_path / "out" / "vae", "reconstruction")
    assert len(vae_curve) == 12 and vae_curve[-1] < 0.7 * vae_curve[0], vae_curve
    exported = VisualDecoder.from_pretrained(tmp_path / "out" / "decoder")
    factor = result.summary["vae"]["scaling_factor"]
    assert exported.vae.config.scaling_factor == pytest.approx(factor) == pytest.approx(exported.config.vae_scaling_factor)
    assert factor != pytest.approx(world.architecture.vae_scaling_factor)
    samples = [s for _, s in zip(range(8), iter_samples(world.data[0]))]
    pixels = unit_range([center_crop(target(s)[2], config.output_size)[0] for s in samples])
    assert _vae_l1(exported, pixels) < 0.7 * _vae_l1(random_vae, pixels)

    again = train_decoder(config, world.architecture, world.data, tmp_path / "out")
    assert again.summary["vae"]["resumed_from"] == 12 and again.summary["resumed_from"] == 2
    assert again.summary["vae"]["scaling_factor"] == pytest.approx(factor)


def test_precomputed_latents_need_the_pretrained_decoder_that_made_them(world, store):
    with pytest.raises(ConfigError, match="decoder.precomputed .* needs decoder.init"):
        train_decoder(decoder_config(world, "init=", "augment=false", f"precomputed={store}"), world.architecture,
                      world.data, world.root / "never")
