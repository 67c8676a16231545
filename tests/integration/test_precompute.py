"""The precompute stage (Ray Data job + store) on a tiny Emu model and generated shards (CPU).

One local Ray (2 CPUs) serves the whole module; the job joins it instead of starting its own, and
the CLI test joins it through --ray-address. Every test that changes an output works on a copy.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from emu.data.schema import Interleaved, Pair, Segment
from emu.data.sequence import SequenceBuilder, SequenceRules, VisualSlot
from emu.data.shards import ShardWriter, iter_samples
from emu.data.tokenizer import train_tokenizer
from emu.errors import ConfigError, DatasetError
from emu.model.config import EmuConfig
from emu.model.emu import EmuModel
from emu.model.io import load_model, save_model
from emu.model.vision import preprocess, resize_position_embeddings
from emu.precompute.config import PrecomputeConfig
from emu.precompute.job import run_precompute
from emu.precompute.store import PrecomputedStore, embedding_lookup
from emu.train.lm_step import LMBatcher

EMU = Path(sys.executable).parent / "emu"
SIDES = [2, 4]  # the tiny EmuConfig: 32 px / patch 4 = an 8x8 grid; model sides 2 (images, frames)
CONFIG = PrecomputeConfig(sides=SIDES, batch_size=4, actors=1, gpus_per_actor=0)
PARTS = ["pairs/shard-000000", "pairs/shard-000001", "pairs/shard-000002", "video/shard-000000"]


def png(seed: int, size: tuple[int, int] = (40, 36)) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def ray_address():
    import ray

    temp = tempfile.mkdtemp(prefix="emu-ray-")  # short: Ray's socket paths must stay < 108 chars
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("precompute")
    with ShardWriter(root / "data" / "pairs", "test", samples_per_shard=3) as writer:
        for i in range(6):
            writer.write(Pair(key=f"p{i}", images=[png(i, (40 + i, 36))], text=f"a picture of thing {i}"))
        writer.write(Interleaved(key="doc", images=[png(50), png(51)], segments=[
            Segment(text="first"), Segment(image=0), Segment(text="then"), Segment(image=1)]))
        writer.close()
    frames = [png(100), png(101), png(100), png(102)]  # a repeated frame: one stored tensor
    with ShardWriter(root / "data" / "video", "test") as writer:
        writer.write(Pair(key="v0", images=frames, text="a short video", media="video"))
        writer.close()
    tokenizer = train_tokenizer([f"a picture of thing {i} first then a short video" for i in range(40)],
                                vocab_size=300)
    torch.manual_seed(0)
    model = EmuModel.build(EmuConfig(), tokenizer)
    save_model(model, tokenizer, root / "model_a")
    with torch.no_grad():  # another encoder: same architecture, other weights
        model.visual.blocks[0].mlp.fc1.weight.add_(0.01)
    save_model(model, tokenizer, root / "model_b")
    return SimpleNamespace(root=root, data=[root / "data"], model_a=root / "model_a", model_b=root / "model_b")


@pytest.fixture(scope="module")
def first(world, ray_address):
    out = world.root / "out"
    return out, run_precompute(world.data, str(world.model_a), out, CONFIG)


def copy_of(out: Path, tmp_path: Path) -> Path:
    target = tmp_path / "out"
    shutil.copytree(out, target)
    return target


def mtimes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("shard-*")}


def all_images(world) -> list[tuple[str, int, bytes]]:
    return [(s.key, i, data) for folder in ("pairs", "video")
            for s in iter_samples(world.root / "data" / folder) for i, data in enumerate(s.images)]


def encode_online(model: EmuModel, images: list[bytes], side: int) -> torch.Tensor:
    pixels = preprocess([Image.open(io.BytesIO(d)) for d in images], model.visual.config)
    with torch.no_grad():
        return model.encode_images(pixels, side)


# ---- (a) what is stored ------------------------------------------------------------------------

def test_first_run_writes_one_part_per_shard_and_the_encoder_embeddings(world, first):
    out, summary = first
    images = all_images(world)
    assert summary.computed == PARTS and summary.parts_kept == 0
    assert summary.images == summary.images_computed == len(images) == 12 and summary.images_per_s > 0
    record = json.loads((out / "precompute.json").read_text())
    assert record["counts"]["images"] == 12 and record["sides"] == SIDES
    assert not {"created", "model", "seconds", "computed"} & set(record), "no run-specific value in the content"
    assert (out / "precompute.config.yaml").is_file()
    index = json.loads((out / "video" / "shard-000000.index.json").read_text())
    assert [(r["key"], r["index"]) for r in index["rows"]] == [("v0", i) for i in range(4)]
    assert index["rows"][0]["embedding"] == index["rows"][2]["embedding"], "same frame bytes, same address"
    assert not list(out.rglob("*.tmp"))

    model, _ = load_model(world.model_a)
    store = PrecomputedStore(out)
    for side in SIDES:
        got = store.embeddings(images, side)
        assert got.shape == (12, side * side, model.config.visual_dim)
        torch.testing.assert_close(got, encode_online(model, [d for _, _, d in images], side))


# ---- (b), (c) re-runs --------------------------------------------------------------------------

def test_two_identical_precompute_runs_give_identical_md5s(world, first, tmp_path):
    """The same inputs, written again from scratch into another folder: the same bytes, so the
    folder's DVC md5 (what the tasks after precompute are cached on) does not change."""
    from emu.artifacts.dvc import ArtifactStore

    again = tmp_path / "again"
    run_precompute(world.data, str(world.model_a), again, CONFIG)
    files = sorted(str(p.relative_to(first[0])) for p in first[0].rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(again)) for p in again.rglob("*") if p.is_file())
    differ = [f for f in files if (first[0] / f).read_bytes() != (again / f).read_bytes()]
    assert not differ, differ
    store = ArtifactStore(tmp_path / "remote")
    assert store.md5(first[0]) == store.md5(again)


def test_rerun_on_unchanged_data_computes_nothing(world, first, tmp_path):
    out = copy_of(first[0], tmp_path)
    before = mtimes(out)
    summary = run_precompute(world.data, str(world.model_a), out, CONFIG)
    assert (summary.parts_computed, summary.images_computed, summary.parts_kept) == (0, 0, 4)
    assert summary.images == 12 and mtimes(out) == before
    assert (out / "precompute.json").is_file()


def test_a_deleted_part_is_recomputed_alone(world, first, tmp_path):
    out = copy_of(first[0], tmp_path)
    (out / "pairs" / "shard-000001.safetensors").unlink()
    before = mtimes(out)
    summary = run_precompute(world.data, str(world.model_a), out, CONFIG)
    assert summary.computed == ["pairs/shard-000001"] and summary.images_computed == 3
    after = mtimes(out)
    changed = {name for name in after if after[name] != before.get(name)}
    assert changed == {"pairs/shard-000001.safetensors", "pairs/shard-000001.index.json"}
    again, before_delete = (load_file(str(folder / "pairs" / "shard-000001.safetensors")) for folder in (out, first[0]))
    assert again.keys() == before_delete.keys() and all(torch.equal(again[k], before_delete[k]) for k in again)


def test_undecodable_images_are_named_and_the_other_parts_kept(world, ray_address, tmp_path):
    with ShardWriter(tmp_path / "bad", "test", samples_per_shard=2) as writer:
        for i in range(4):
            image = b"\x89PNG\r\n\x1a\n broken" if i == 3 else png(i)
            writer.write(Pair(key=f"b{i}", images=[image], text="a picture"))
        writer.close()
    out = tmp_path / "out"
    with pytest.raises(DatasetError, match=r"1 samples or images .*\n  bad/shard-000001 key 'b3': image_undecodable"):
        run_precompute([tmp_path / "bad"], str(world.model_a), out, CONFIG)
    assert (out / "bad" / "shard-000000.index.json").is_file()  # nothing computed is lost
    assert not (out / "bad" / "shard-000001.index.json").exists() and not (out / "precompute.json").exists()
    with pytest.raises(ConfigError, match="its run did not finish"):
        PrecomputedStore(out)


# ---- (d) compatibility -------------------------------------------------------------------------

def test_another_encoder_is_refused_and_a_rerun_recomputes_everything(world, first, tmp_path):
    out = copy_of(first[0], tmp_path)
    model_b, _ = load_model(world.model_b)
    with pytest.raises(ConfigError, match="precomputed with a different encoder"):
        embedding_lookup(out, model_b)
    summary = run_precompute(world.data, str(world.model_b), out, CONFIG)
    assert summary.computed == PARTS and summary.images_computed == 12
    images = all_images(world)
    lookup = embedding_lookup(out, model_b)
    slots = [VisualSlot(key=k, index=i, data=d, kind="image", regress=True) for k, i, d in images]
    torch.testing.assert_close(lookup(slots, "image"), encode_online(model_b, [d for _, _, d in images], 2))


def test_the_store_names_what_does_not_match(world, first):
    out = first[0]
    model, _ = load_model(world.model_a)
    wider = dataclasses.replace(model.config, image_tokens_side=8)
    model.config = wider
    with pytest.raises(ConfigError, match=r"needs side\(s\) \[8\].*precompute.sides=\[2, 4, 8\]"):
        embedding_lookup(out, model)
    model, _ = load_model(world.model_a)
    resize_position_embeddings(model.visual, 64)
    with pytest.raises(ConfigError, match="precomputed at 32 px but the model reads 64 px"):
        embedding_lookup(out, model)

    model, _ = load_model(world.model_a)
    lookup = embedding_lookup(out, model)
    unknown = VisualSlot(key="nope", index=0, data=png(999), kind="image", regress=False)
    with pytest.raises(ConfigError, match=r"key 'nope' image 0 .*no precomputed shard holds key 'nope'"):
        lookup([unknown], "image")
    changed = VisualSlot(key="p4", index=0, data=png(998), kind="image", regress=False)
    with pytest.raises(ConfigError, match=r"key 'p4' image 0 .*dataset pairs shard shard-000001.tar .*bytes differ"):
        lookup([changed], "image")
    with pytest.raises(ConfigError, match="no precompute.json"):
        PrecomputedStore(world.root)


def test_settings_are_checked_and_named():
    for kwargs, name in (({"sides": [0]}, "precompute.sides"), ({"sides": [2, 2]}, "precompute.sides"),
                         ({"batch_size": 0}, "precompute.batch_size"), ({"latents": True}, "precompute.decoder"),
                         ({"gpus_per_actor": -2}, "precompute.gpus_per_actor"), ({"dtype": "fp8"}, "precompute.dtype")):
        with pytest.raises(ConfigError, match=name):
            PrecomputeConfig(**kwargs)


def test_latents_and_crop_embeddings_match_the_decoder_and_encoder(world, ray_address, tmp_path):
    from emu.model.config import DecoderConfig
    from emu.model.decoder import VisualDecoder
    from emu.precompute.encoder import center_crop, unit_range
    from emu.precompute.store import latent_lookup

    torch.manual_seed(0)
    decoder = VisualDecoder.from_config(DecoderConfig(visual_dim=32))  # 32 px output, x2 VAE
    decoder.save_pretrained(tmp_path / "decoder")
    config = dataclasses.replace(CONFIG, latents=True, decoder=str(tmp_path / "decoder"))
    summary = run_precompute([world.root / "data" / "video"], str(world.model_a), tmp_path / "out", config)
    assert summary.images_computed == 4
    model, _ = load_model(world.model_a)
    images = [(k, i, d) for k, i, d in all_images(world) if k == "v0"]
    latents, conditions, time_ids = latent_lookup(tmp_path / "out", decoder, encoder=model)(images)
    crops, ids = zip(*(center_crop(d, 32) for _, _, d in images))
    with torch.no_grad():
        expected = decoder.encode_latents(unit_range(list(crops)), sample=False)
    assert latents.shape == (4, 4, 16, 16) and time_ids.tolist() == [list(i) for i in ids]
    torch.testing.assert_close(latents, expected)
    with torch.no_grad():
        torch.testing.assert_close(conditions, model.encode_images(preprocess(list(crops), model.visual.config), 2))
    with pytest.raises(ConfigError, match="holds latents of 32 px crops but the decoder trains at 64 px"):
        latent_lookup(tmp_path / "out", decoder, size=64)


# ---- (e) training reads them -------------------------------------------------------------------

def test_lm_loss_is_the_same_with_precomputed_and_online_embeddings(world, first):
    model, tokenizer = load_model(world.model_a)
    model.eval()
    rules = SequenceRules(mode="pretrain", image_tokens=4, frame_tokens=4, max_len=256)
    batcher = LMBatcher(SequenceBuilder(tokenizer, rules), max_len=256, packing=True, micro_rows=4,
                        pad_id=tokenizer.pad_token_id, seed=0, vision=model.visual.config,
                        attn_implementation=model.config.lm.attn_implementation,
                        mask_dtype=torch.float32,
                        video_frames=2)  # frames subsampled: slot indices are no longer shard indices
    samples = [s for folder in ("pairs", "video") for s in iter_samples(world.root / "data" / folder)]
    batches, _ = batcher.batches(samples, step=0)
    assert sum(len(b.image_slots) for b in batches) == 8 and sum(len(b.frame_slots) for b in batches) == 2
    lookup = embedding_lookup(first[0], model)
    size = model.visual.config.image_size
    for batch in batches:
        batcher.embeddings = None
        online = batcher.micro_batch(batch, size)
        batcher.embeddings = lookup
        precomputed = batcher.micro_batch(batch, size)
        assert "images" in online.inputs and "image_embeds" in precomputed.inputs
        assert "images" not in precomputed.inputs
        with torch.no_grad():
            a, b = model(**online.model_inputs("cpu")), model(**precomputed.model_inputs("cpu"))
        assert a.image_targets > 0 and a.image_targets == b.image_targets
        for name in ("loss", "text_loss", "image_loss"):
            torch.testing.assert_close(getattr(b, name), getattr(a, name))


def test_pixels_resized_on_the_device_train_as_pixels_resized_by_the_loader(world):
    """resize_on_device (a GPU stage): a micro-batch's images that share one stored size ship at
    it (the video's frames here), mixed sizes are resized by the loader as before (the pairs);
    on the device, model_inputs gives the loader's pixels and the same losses."""
    model, tokenizer = load_model(world.model_a)
    model.eval()
    rules = SequenceRules(mode="pretrain", image_tokens=4, frame_tokens=4, max_len=256)
    batcher = LMBatcher(SequenceBuilder(tokenizer, rules), max_len=256, packing=True, micro_rows=4,
                        pad_id=tokenizer.pad_token_id, seed=0, vision=model.visual.config,
                        attn_implementation=model.config.lm.attn_implementation, mask_dtype=torch.float32,
                        video_frames=2)
    samples = [s for folder in ("pairs", "video") for s in iter_samples(world.root / "data" / folder)]
    size = model.visual.config.image_size
    shipped = set()
    for batch in batcher.batches(samples, step=0)[0]:
        batcher.resize_on_device = False
        host = batcher.micro_batch(batch, size)
        batcher.resize_on_device = True
        device = batcher.micro_batch(batch, size)
        shipped |= {(name, tuple(t.shape[-2:])) for name, t in device.inputs.items() if name in ("images", "frames")}
        a, b = host.model_inputs("cpu"), device.model_inputs("cpu")
        for name in ("images", "frames"):
            if name in a:
                assert a[name].shape == b[name].shape and (a[name].int() - b[name].int()).abs().max() <= 2
        with torch.no_grad():
            expected, got = model(**a), model(**b)
        for name in ("loss", "text_loss", "image_loss"):
            torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=1e-4, atol=1e-5)
    assert shipped == {("images", (size, size)), ("frames", (36, 40))}


# ---- (f) the command ---------------------------------------------------------------------------

def test_cli_precompute_end_to_end(world, first, ray_address, tmp_path):
    out = tmp_path / "cli-out"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
           and not k.startswith("MASTER_")}
    command = [str(EMU), "precompute", "--data", str(world.root / "data" / "pairs"),
               "--data", str(world.root / "data" / "video"), "--model", str(world.model_a), "--out", str(out),
               "--ray-address", ray_address, "--preset", "tiny", "image_size=0", "batch_size=4",
               "actors=0", "gpus_per_actor=-1"]  # auto: one actor, no GPU on this CPU cluster
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "images/s" in done.stdout and "computed 12 images (4 parts)" in done.stdout
    for part in PARTS:  # same images, encoder and settings: the same tensors as the in-process run
        cli, ours = (load_file(str(folder / (part + ".safetensors"))) for folder in (out, first[0]))
        assert cli.keys() == ours.keys() and all(torch.equal(cli[k], ours[k]) for k in ours)
    bad = subprocess.run([str(EMU), "precompute", "--data", str(world.root / "data"), "--model",
                          str(world.root / "missing"), "--out", str(tmp_path / "x"), "--preset", "tiny"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "model folder" in bad.stderr and "does not exist" in bad.stderr
