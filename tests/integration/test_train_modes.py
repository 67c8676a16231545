"""What the training stages do to a model loaded from a folder (as every stage after the first
does): trained parts in train mode with gradient checkpointing really active, frozen parts in
eval mode with no gradient; and ZeRO-3 builds it partitioned, never whole on a rank."""

import json
from collections import Counter
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file

from emu.config import resolve
from emu.model.io import load_model
from emu.model.vision import Block
from emu.train.config import OptimizerConfig, RuntimeConfig, Stage1Config, Stage2Config
from emu.train.engine import PartitionedInit, init_distributed
from emu.train.metrics import flop_model
from emu.train.stages import stage1, stage2

LM_LAYERS, VIT_LAYERS = 3, 2  # the tiny preset's model section


@contextmanager
def module_calls():
    """Counts, by module class name, every module call, recomputations in backward included (a
    pre-hook: torch's checkpoint may stop a recomputation before the module returns). transformers
    checkpoints a decoder layer's `forward`, not its call, so a recomputation shows in the calls of
    the layer's parts (LlamaMLP), not of the layer."""
    counts: Counter[str] = Counter()
    models = []

    def hook(module, args):
        counts[type(module).__name__] += 1
        if type(module).__name__ == "EmuModel":
            models.append(module)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield counts, models
    finally:
        handle.remove()


@pytest.mark.parametrize("checkpointing", [True, False])
def test_gradient_checkpointing_recomputes_lm_and_encoder_layers(world, init_model, tmp_path, checkpointing):
    settings = ["steps=2", "runtime.progress=false", f"init={init_model}", "batch_sizes={image_text: 2}",
                f"runtime.gradient_checkpointing={str(checkpointing).lower()}"]
    with module_calls() as (counts, models):
        stage1(resolve(Stage1Config, "stage1", "tiny", settings), None, [world / "img2dataset"], tmp_path / "out")
    forwards = counts["EmuModel"]
    passes = 2 if checkpointing else 1  # forward, and once more in backward when checkpointed
    assert forwards >= 2
    assert counts["LlamaMLP"] == passes * LM_LAYERS * forwards
    assert counts["Block"] == passes * VIT_LAYERS * forwards  # stage 1 trains the encoder


def test_frozen_parts_run_in_eval_mode_without_gradients(world, init_model, tmp_path):
    seen = []

    def watch(module, args, output):
        seen.append((module.training, output.requires_grad))

    settings = ["steps=2", "runtime.progress=false", f"init={init_model}", "runtime.gradient_checkpointing=true",
                "batch_sizes={image_text: 2, text: 1}"]
    with module_calls() as (counts, models):
        handle = torch.nn.modules.module.register_module_forward_hook(
            lambda m, a, o: watch(m, a, o) if isinstance(m, Block) else None)
        try:
            stage2(resolve(Stage2Config, "stage2", "tiny", settings), [world / "img2dataset", world / "text"],
                   tmp_path / "out")
        finally:
            handle.remove()
    model = models[0]
    assert seen and all(training is False and not grad for training, grad in seen), "the frozen encoder trained"
    assert not any(p.requires_grad or p.grad is not None for p in model.visual.parameters())
    assert model.lm.training and model.project_up.training and model.project_down.training
    assert all(p.requires_grad for p in model.lm.parameters())
    # The LM, loaded from a folder in eval mode by transformers, does checkpoint in stage 2.
    assert counts["LlamaMLP"] == 2 * LM_LAYERS * counts["EmuModel"]


def test_zero3_builds_the_model_partitioned_and_loads_every_weight(init_model):
    import deepspeed

    init_distributed()
    runtime = RuntimeConfig(zero_stage=3, zero3_persistence_threshold=0)
    plain, _ = load_model(init_model)
    with PartitionedInit(runtime, OptimizerConfig()) as init:
        model, _ = load_model(init_model, load_weights=init.load_weights)
    params = dict(model.named_parameters())
    assert params and all(hasattr(p, "ds_id") and p.numel() == 0 for p in params.values()), \
        "a parameter was built whole"
    assert flop_model(model, True) == flop_model(plain, True)
    expected = plain.state_dict()
    with deepspeed.zero.GatheredParameters(list(params.values())):
        for name, param in params.items():
            assert torch.equal(param.data, expected[name]), name
    from transformers.integrations import is_deepspeed_zero3_enabled

    assert not is_deepspeed_zero3_enabled(), "the ZeRO-3 setting leaked out of the build"


def test_zero3_load_refuses_a_weights_file_that_does_not_match(init_model, tmp_path):
    import shutil

    from safetensors.torch import save_file

    from emu.errors import ConfigError

    init_distributed()
    broken = tmp_path / "model"
    shutil.copytree(init_model, broken)
    state = load_file(str(broken / "model.safetensors"))
    state["project_up.weight"] = state["project_up.weight"][:, :3].contiguous()
    del state["visual.cls_token"]
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"missing \['visual.cls_token'\].*project_up.weight"):
        with PartitionedInit(RuntimeConfig(zero_stage=3), OptimizerConfig()) as init:
            load_model(broken, load_weights=init.load_weights)
    with pytest.raises(ConfigError, match=r"missing \['visual.cls_token'\].*project_up.weight"):
        load_model(broken)


def test_zero3_fresh_build_is_initialised_like_a_plain_one(world):
    """Weights initialised after a module's constructor would hit the empty shard and be lost:
    a fresh model built partitioned must have the same init distributions as a plain build."""
    import deepspeed

    from emu.data.shards import iter_samples
    from emu.data.tokenizer import train_tokenizer
    from emu.model.config import EmuConfig
    from emu.model.emu import EmuModel

    init_distributed()
    tokenizer = train_tokenizer((t for s in iter_samples(world / "img2dataset") for t in s.texts()), vocab_size=400)
    config = resolve(EmuConfig, "model", "tiny")
    plain = EmuModel.build(config, tokenizer)
    with PartitionedInit(RuntimeConfig(zero_stage=3, zero3_persistence_threshold=0), OptimizerConfig()):
        model = EmuModel.build(config, tokenizer)
    params = dict(model.named_parameters())
    assert all(p.numel() == 0 for p in params.values())
    reference = dict(plain.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        for name in ("project_up.weight", "project_down.weight", "lm.model.layers.0.mlp.up_proj.weight",
                     "lm.model.embed_tokens.weight", "visual.pos_embed", "visual.blocks.0.attn.qkv.weight"):
            built, expected = params[name].data, reference[name].data
            assert built.shape == expected.shape, name
            assert float(built.std()) == pytest.approx(float(expected.std()), rel=0.15), name
        assert float(params["project_up.weight"].data.std()) == pytest.approx(0.02, rel=0.1)


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_ones(world, init_model, tmp_path):
    """runtime.compile: torch.compile per LM layer and encoder block gives the eager losses."""
    losses = {}
    for compiled in (False, True):
        out = tmp_path / f"compile-{compiled}"
        settings = ["steps=3", "runtime.progress=false", f"init={init_model}", "batch_sizes={image_text: 2, text: 1}",
                    f"runtime.compile={str(compiled).lower()}"]
        stage2(resolve(Stage2Config, "stage2", "tiny", settings), [world / "img2dataset", world / "text"], out)
        losses[compiled] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
