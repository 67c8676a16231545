"""What only a GPU shows: the training forward queues its kernels without waiting on the device,
and the stages train in bf16 on CUDA (their tensors on the engine's device)."""

import json
import random

import pytest
import torch

from emu.config import resolve
from emu.data.packing import collate, pack
from emu.data.schema import Pair
from emu.data.sequence import SequenceBuilder, SequenceRules
from emu.data.synth import world as shapes
from emu.data.tokenizer import train_tokenizer
from emu.model.config import EmuConfig, LMConfig
from emu.model.emu import EmuModel, SequenceLayout

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("attention", ["sdpa", "flex_attention"])
def test_packed_forward_and_backward_never_sync_on_cuda(attention):
    """torch.cuda.set_sync_debug_mode("error") raises at any op that makes the host wait for the
    GPU; a packed bf16 micro-batch with its host-computed layout runs forward and backward
    under it (the CPU test probes the dispatcher instead: tests/unit/test_packing.py)."""
    rng = random.Random(0)
    scenes = [shapes.sample_scene(rng, size=16) for _ in range(12)]
    tok = train_tokenizer([shapes.caption(s) for s in scenes] * 4, 400)
    config = EmuConfig(lm=LMConfig(attn_implementation="sdpa"))
    builder = SequenceBuilder(tok, SequenceRules(mode="pretrain", image_tokens=config.tokens_per_image(),
                                                 frame_tokens=config.tokens_per_image(), max_len=256))
    sequences = [seq for i, s in enumerate(scenes) for seq in builder.build(
        Pair(key=str(i), images=[shapes.encode(shapes.render(s), "png")], text=shapes.caption(s)), rng)]
    batch = collate(pack(sequences, 256), tok.pad_token_id)
    torch.manual_seed(0)
    model = EmuModel.build(config, tok).cuda().to(torch.bfloat16)
    model.lm.set_attn_implementation(attention)
    layout = SequenceLayout.of(batch.input_ids, batch.targets, model.token_ids, batch.image_regress,
                               batch.frame_regress).to("cuda")
    embeds = torch.randn(len(batch.image_slots), config.tokens_per_image(), config.visual_dim,
                         device="cuda", dtype=torch.bfloat16)
    inputs = dict(input_ids=batch.input_ids.cuda(), text_targets=batch.targets.cuda(),
                  position_ids=batch.position_ids.cuda(), image_embeds=embeds,
                  attention_mask=(batch.attention_mask.cuda() if attention == "sdpa" else None))
    model(**inputs, layout=layout).loss.backward()  # warm-up: compiles flex, loads kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = model(**inputs, layout=layout)
        out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.loss).item()


@pytest.mark.parametrize("attention", ["sdpa", "flex_attention"])
def test_stage2_trains_in_bf16_on_cuda(world, init_model, tmp_path, attention):
    from emu.train.config import Stage2Config
    from emu.train.stages import stage2

    overrides = [f"init={init_model}", "steps=6", "runtime.progress=false", "runtime.precision=bf16",
                 f"runtime.attention={attention}", "runtime.loader_workers=2"]
    stage2(resolve(Stage2Config, "stage2", "tiny", overrides), [world / "img2dataset", world / "mmc4"], tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records]
    assert all(loss is not None for loss in losses) and losses[-1] < losses[0]
    assert all("mfu" in r for r in records)
    assert (tmp_path / "model").is_dir()
