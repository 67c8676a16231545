"""The training stages: one typed function each, with declared inputs and outputs (paths).

    stage1(config, architecture, data, out)   pairs, captioning loss, encoder + projection + LM (Emu2 §2.2.2)
    stage2(config, data, out)                 mixture, text CE + visual L2, encoder frozen (§2.2.2)
    train_decoder(config, architecture, data, out)   UNet autoencoding of visual embeddings (§2.2.3)
    instruct(config, data, out)               chat (answers only, 16x16 tokens) or gen (last image) (§2.3)

Each reads the previous stage's exported model (`config.init`, a folder or s3:// URI) and writes:
    out/model/ (or out/decoder/)   the consolidated export, Hugging Face-style
    out/checkpoints/               resumable DeepSpeed checkpoints
    out/metrics.jsonl, out/tensorboard/, out/summary.json, out/<stage>.config.yaml
Re-running a stage on the same `out` resumes from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from emu.config import save_resolved
from emu.data.sequence import SequenceBuilder, SequenceRules
from emu.errors import ConfigError
from emu.model.config import DecoderConfig, EmuConfig
from emu.model.emu import EmuModel
from emu.model.io import load_model, save_model
from emu.model.vision import interpolate_positions
from emu.train import engine as engine_mod
from emu.train.config import DecoderTrainConfig, InstructConfig, RuntimeConfig, Stage1Config, Stage2Config
from emu.train.data import build_mixture
from emu.train.lm_step import LMBatcher, LMStep, LMWeights
from emu.train.metrics import flop_model, peak_flops
from emu.train.preflight import check_step_memory, check_visual_budget
from emu.train.schedule import multiplier, segmented_multiplier
from emu.train.trainer import Trainer, TrainSummary

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageResult:
    stage: str
    out_dir: Path
    export: Path            # the exported model (or decoder) folder
    summary: dict[str, Any]


# ---- shared setup ------------------------------------------------------------------------------

def _start(stage: str, config: Any, out: Path) -> tuple[int, int]:
    check_step_memory(stage, config)  # before anything is allocated
    rank, world = engine_mod.init_distributed()
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        save_resolved(config, stage, out / f"{stage}.config.yaml")
    torch.manual_seed(config.runtime.seed)  # model init (fresh parts) is the same on every rank
    return rank, world


def _freeze(model: EmuModel, trainable: list[str]) -> None:
    """Trained parts in train mode with gradients, frozen parts in eval mode without: a model
    loaded from a folder comes back in eval mode (transformers' from_pretrained), where the LM's
    gradient checkpointing and any dropout are silently off."""
    model.train()
    for name in ("visual", "cformer", "project_up", "lm", "project_down"):
        module = getattr(model, name)
        if module is not None:
            module.requires_grad_(name in trainable)
            module.train(name in trainable)


def _group(name: str, modules: list, lr: float) -> dict[str, Any]:
    return {"name": name, "lr": lr, "params": [p for m in modules if m is not None for p in m.parameters()]}


def _set_attention(model: EmuModel, runtime: RuntimeConfig) -> str:
    """The LM's attention over packed rows for this run (RuntimeConfig.attention); returns it."""
    attention = runtime.attention
    if attention == "flex_attention" and not torch.cuda.is_available():
        raise ConfigError("runtime.attention=flex_attention needs a CUDA device (FlexAttention has no backward on "
                          "CPU); use sdpa")
    if attention != model.lm.config._attn_implementation:
        model.lm.set_attn_implementation(attention)
    return attention


def _enable_checkpointing(model: EmuModel, runtime: RuntimeConfig) -> None:
    """Gradient checkpointing and per-block compilation (RuntimeConfig), applied from outside the
    model (DESIGN.md convention 1)."""
    if runtime.gradient_checkpointing:
        model.lm.activation_checkpointing_enable()
        model.visual.gradient_checkpointing = True
    if runtime.compile:
        for block in [*model.lm.get_decoder().layers, *model.visual.blocks]:
            block.compile()


def _export(engine: engine_mod.Engine, model: EmuModel, tokenizer, folder: Path, rank: int,
            image_size: int | None = None) -> Path:
    """Save the consolidated weights (gathered from ZeRO partitions onto rank 0); with
    `image_size`, the positions are baked for that input resolution and the config says so."""
    state = engine.consolidated_state_dict()
    if rank == 0:
        config = model.config
        if image_size is not None and image_size != config.vision.image_size:
            grid = image_size // config.vision.patch_size
            state["visual.pos_embed"] = interpolate_positions(state["visual.pos_embed"], grid)
            config = dataclasses.replace(config, vision=dataclasses.replace(config.vision, image_size=image_size))
        save_model(model, tokenizer, folder, state_dict=state, config=config)
    engine_mod.barrier()
    return folder


def _finish(stage: str, out: Path, export: Path, summary: TrainSummary, rank: int, extra: dict | None = None) -> StageResult:
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    record = {"stage": stage, "steps": summary.steps, "resumed_from": summary.resumed_from, "world_size": world,
              "seconds": round(summary.seconds, 2), "final": summary.final, "export": str(export), **(extra or {})}
    if rank == 0:
        (out / "summary.json").write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
        log.info("%s done: %s", stage, {k: v for k, v in summary.final.items()
                                         if k in ("step", "loss", "text_loss", "image_loss")})
    return StageResult(stage=stage, out_dir=out, export=export, summary=record)


def _load_init(config, stage: str, init: engine_mod.PartitionedInit) -> tuple[EmuModel, Any]:
    """The previous stage's model at this stage's input size (partitioned under ZeRO-3)."""
    if not config.init:
        raise ConfigError(f"{stage}.init must name the previous stage's model (a folder or s3:// URI)")
    # fp32 whatever the export's dtype (a bf16 run exports bf16): DeepSpeed casts for bf16 runs and
    # keeps fp32 masters; an fp32 run must not silently train a bf16 LM.
    return load_model(config.init, dtype=torch.float32, image_size=config.image_size,
                      load_weights=init.load_weights)


def _lm_step(engine, model, tokenizer, rules: SequenceRules, sequence, runtime, world, weights=None,
             video_frames=None, encoder_trains=False, precomputed: str = "", image_size=None) -> LMStep:
    """The stage's LM step: its CPU half (LMBatcher, run by the data loader) and device half."""
    batcher = LMBatcher(SequenceBuilder(tokenizer, rules), max_len=sequence.max_len, packing=sequence.packing,
                        micro_rows=runtime.micro_batch_size, pad_id=tokenizer.pad_token_id, seed=runtime.seed,
                        vision=model.visual.config, attn_implementation=_set_attention(model, runtime),
                        mask_dtype=model.project_up.weight.dtype, image_size=image_size,
                        video_frames=video_frames, embeddings=_embedding_lookup(precomputed, model),
                        max_visuals=runtime.micro_batch_images, resize_on_device=engine.device.type != "cpu")
    return LMStep(engine=engine, batcher=batcher, world=world, weights=weights,
                  flops=flop_model(model, encoder_trains),
                  encode_blank=not precomputed and (encoder_trains or runtime.zero_stage == 3))


def _preflight(stage: str, config, data: list[Path], rules: SequenceRules) -> None:
    """Fail before the first step if samples cannot fit a row (emu.train.preflight)."""
    check_visual_budget(stage, data, config.batch_sizes, rules.max_len, rules.image_tokens, rules.frame_tokens,
                        rules.too_long, max_frames=getattr(config, "video_frames", None))


# ---- stage 1 -----------------------------------------------------------------------------------

def stage1(config: Stage1Config, architecture: EmuConfig, data: list[Path], out: Path) -> StageResult:
    """Pretraining on image/video-text pairs with the captioning loss only (Emu2 §2.2.2)."""
    out = Path(out)
    rank, world = _start("stage1", config, out)
    with engine_mod.PartitionedInit(config.runtime, config.optimizer) as init:
        if config.init:
            model, tokenizer = _load_init(config, "stage1", init)
        else:
            tokenizer = _tokenizer_for(config, architecture, data)
            vision = dataclasses.replace(architecture.vision, image_size=config.image_size)
            # Pretrained parts (Emu2 §2.1) when the model section names them: the LM (and its
            # tokenizer) from model.lm.pretrained, the encoder from model.vision.pretrained,
            # filled partition by partition under ZeRO-3 (init.load_weights), the LM's vocabulary
            # resized outside zero.Init (init.unpartitioned).
            model = EmuModel.build(dataclasses.replace(architecture, vision=vision), tokenizer, partitioned=init)
    _freeze(model, config.trainable)
    _enable_checkpointing(model, config.runtime)
    groups = [_group("encoder", [model.visual, model.cformer], config.lr_encoder),
              _group("projection", [model.project_up, model.project_down], config.lr_projection),
              _group("lm", [model.lm], config.lr_lm)]
    boundaries = [step for step, _ in config.resolution_schedule] if config.restart_schedule_on_resize else []
    engine = engine_mod.Engine(model, groups, config.runtime, config.optimizer,
                               lambda s: segmented_multiplier(s, boundaries, config.steps, config.schedule))
    rules = SequenceRules(mode="caption", image_tokens=model.config.tokens_per_image(),
                          frame_tokens=model.config.tokens_per_image(model.config.video_tokens_side),
                          max_len=config.sequence.max_len, too_long=config.sequence.too_long)
    _preflight("stage1", config, data, rules)
    sizes = {step: size for step, size in config.resolution_schedule}

    def size_at(step: int) -> int:
        current = config.image_size
        for boundary, size in sorted(sizes.items()):
            if step >= boundary:
                current = size
        return current

    def resolution_at(step: int) -> None:
        # The positions interpolate on the fly; only the input size changes (the batcher
        # resizes each step's images to size_at(step) itself, in the loader).
        model.visual.config = dataclasses.replace(model.visual.config, image_size=size_at(step))

    step_fn = _lm_step(engine, model, tokenizer, rules, config.sequence, config.runtime, world,
                       video_frames=config.video_frames, encoder_trains="visual" in config.trainable,
                       image_size=size_at)

    summary = Trainer(engine=engine, data=build_mixture(data, config.batch_sizes, config.runtime.seed, rank, world),
                      step_fn=step_fn, out_dir=out, steps=config.steps, runtime=config.runtime, rank=rank,
                      world=world, stage="stage1", peak_flops=peak_flops(config.runtime.peak_tflops),
                      on_step_start=resolution_at).run()
    final_size = sizes[max(sizes)] if sizes else config.image_size
    export = _export(engine, model, tokenizer, out / "model", rank, image_size=final_size)
    return _finish("stage1", out, export, summary, rank)


def _tokenizer_for(config: Stage1Config, architecture: EmuConfig, data: list[Path]):
    """The tokenizer of a model built from scratch: a given folder (stage1.tokenizer), else the
    pretrained LM's own (model.lm.pretrained), else a BPE trained on the data."""
    from emu.data.shards import iter_samples
    from emu.data.tokenizer import load_tokenizer, train_tokenizer
    from emu.model.io import local_folder
    from emu.model.pretrained import lm_folder
    from emu.train.data import discover

    if config.tokenizer:
        return load_tokenizer(local_folder(config.tokenizer), "stage1.tokenizer")
    if architecture.lm.pretrained:
        return load_tokenizer(lm_folder(architecture.lm.pretrained), "model.lm.pretrained")
    datasets = sorted({ref.path for refs in discover(data).values() for ref in refs})
    texts = (text for folder in datasets for sample in iter_samples(folder) for text in sample.texts())
    return train_tokenizer(texts, vocab_size=config.tokenizer_vocab)


# ---- stage 2 and instruction tuning -------------------------------------------------------------

def stage2(config: Stage2Config, data: list[Path], out: Path) -> StageResult:
    """Pretraining on the mixture with text CE + visual regression; encoder frozen (Emu2 §2.2.2)."""
    out = Path(out)
    rank, world = _start("stage2", config, out)
    with engine_mod.PartitionedInit(config.runtime, config.optimizer) as init:
        model, tokenizer = _load_init(config, "stage2", init)
    _freeze(model, config.trainable)
    _enable_checkpointing(model, config.runtime)
    engine = engine_mod.Engine(model, [_group("trainable", [model.project_up, model.lm, model.project_down], config.lr)],
                               config.runtime, config.optimizer, lambda s: multiplier(s, config.steps, config.schedule))
    rules = SequenceRules(mode="pretrain", image_tokens=model.config.tokens_per_image(),
                          frame_tokens=model.config.tokens_per_image(model.config.video_tokens_side),
                          max_len=config.sequence.max_len, image_text_order_p=config.image_text_order_p,
                          too_long=config.sequence.too_long)
    _preflight("stage2", config, data, rules)
    step_fn = _lm_step(engine, model, tokenizer, rules, config.sequence, config.runtime, world,
                       weights=LMWeights(config.text_loss_weight, config.image_loss_weight),
                       precomputed=config.precomputed)
    summary = Trainer(engine=engine, data=build_mixture(data, config.batch_sizes, config.runtime.seed, rank, world),
                      step_fn=step_fn, out_dir=out, steps=config.steps, runtime=config.runtime, rank=rank,
                      world=world, stage="stage2", peak_flops=peak_flops(config.runtime.peak_tflops)).run()
    export = _export(engine, model, tokenizer, out / "model", rank)
    return _finish("stage2", out, export, summary, rank)


def instruct(config: InstructConfig, data: list[Path], out: Path) -> StageResult:
    """Instruction tuning (Emu2 §2.3): chat (16x16 tokens per image, loss on answers only) or gen
    (regression on the last image only, entity dropping)."""
    out = Path(out)
    stage = "instruct" if config.mode == "chat" else "instruct_gen"
    rank, world = _start(stage, config, out)
    with engine_mod.PartitionedInit(config.runtime, config.optimizer) as init:
        model, tokenizer = _load_init(config, stage, init)
    if config.mode == "chat":  # Emu2-Chat reads images at 16x16 = 256 tokens (§2.3.1)
        model.config = dataclasses.replace(model.config, image_tokens_side=config.image_tokens_side,
                                           video_tokens_side=config.video_tokens_side)
    _freeze(model, config.trainable)
    _enable_checkpointing(model, config.runtime)
    engine = engine_mod.Engine(model, [_group("trainable", [model.project_up, model.lm, model.project_down], config.lr)],
                               config.runtime, config.optimizer, lambda s: multiplier(s, config.steps, config.schedule))
    rules = SequenceRules(mode=config.mode, image_tokens=model.config.tokens_per_image(),
                          frame_tokens=model.config.tokens_per_image(model.config.video_tokens_side),
                          max_len=config.sequence.max_len, system_messages=dict(config.system_messages),
                          entity_drop_p=config.entity_drop_p, too_long=config.sequence.too_long)
    _preflight(stage, config, data, rules)
    step_fn = _lm_step(engine, model, tokenizer, rules, config.sequence, config.runtime, world,
                       precomputed=config.precomputed)
    summary = Trainer(engine=engine, data=build_mixture(data, config.batch_sizes, config.runtime.seed, rank, world),
                      step_fn=step_fn, out_dir=out, steps=config.steps, runtime=config.runtime, rank=rank,
                      world=world, stage=stage, peak_flops=peak_flops(config.runtime.peak_tflops)).run()
    export = _export(engine, model, tokenizer, out / "model", rank)
    return _finish(stage, out, export, summary, rank)


def _embedding_lookup(precomputed: str, model: EmuModel):
    """Precomputed visual embeddings (emu precompute) instead of encoding online; None = online."""
    if not precomputed:
        return None
    from emu.precompute.store import embedding_lookup

    return embedding_lookup(precomputed, model)


# ---- visual decoder ----------------------------------------------------------------------------

def train_decoder(config: DecoderTrainConfig, architecture: DecoderConfig, data: list[Path], out: Path) -> StageResult:
    """The diffusion decoder trained as an autoencoder of visual embeddings (Emu2 §2.2.3): the
    frozen encoder of `config.encoder` gives the conditions, the frozen VAE the latents, both
    encoded online or read from `config.precomputed` (emu.train.decoder_step)."""
    from emu.model.decoder import VisualDecoder
    from emu.precompute.encoder import load_encoder
    from emu.train.decoder_step import DecoderStep

    out = Path(out)
    if config.runtime.zero_stage == 3:
        raise ConfigError("decoder.runtime.zero_stage 3 is not supported (the export reads full UNet weights); use 2")
    if not config.encoder:
        raise ConfigError("decoder.encoder must name the Emu model whose frozen encoder gives the conditions "
                          "(stage 1's export: a folder or s3:// URI)")
    rank, world = _start("decoder", config, out)
    # The visual encoder (and C-Former) alone, at the stage's input size: the LM, tens of GB for
    # Emu2, is never loaded. Frozen, eval mode (emu.precompute.encoder).
    encoder = load_encoder(config.encoder, config.image_size)
    from emu.model.io import local_folder

    # decoder.init: e.g. SDXL converted by `emu model convert-sdxl` (§2.2.3), local or s3://
    decoder = (VisualDecoder.from_pretrained(local_folder(config.init)) if config.init
               else VisualDecoder.from_config(architecture))
    if decoder.config.visual_dim != encoder.config.visual_dim:
        raise ConfigError(f"the decoder reads {decoder.config.visual_dim}-wide embeddings but the encoder of "
                         f"{config.encoder} makes {encoder.config.visual_dim}-wide ones (visual_decoder.visual_dim)")
    if decoder.config.image_size != config.output_size:
        raise ConfigError(f"decoder.output_size {config.output_size} differs from the decoder's "
                         f"{decoder.config.image_size} px (visual_decoder.sample_size x VAE factor)")
    vae = {}
    if not config.init and config.vae_steps:
        if config.precomputed:
            raise ConfigError(f"decoder.precomputed ({config.precomputed}) needs decoder.init, the pretrained decoder "
                              "whose VAE made the stored latents: without it this stage trains a VAE first "
                              f"(decoder.vae_steps={config.vae_steps}), whose latents no store holds yet")
        from emu.train.vae_step import train_vae

        # A decoder from scratch: its VAE first (LDM §3.1), then frozen for the UNet (emu.model.vae).
        vae = train_vae(config, decoder, data, out / "vae", rank, world)
    elif not config.init:
        log.warning("decoder: no decoder.init and decoder.vae_steps=0: the UNet trains on the latents of a random, "
                    "untrained VAE, which decodes every latent to noise")
    engine = engine_mod.Engine(decoder, [{"name": "unet", "lr": config.lr, "params": list(decoder.unet.parameters())}],
                               config.runtime, config.optimizer, lambda s: multiplier(s, config.steps, config.schedule))
    precomputed = None
    if config.precomputed:
        from emu.precompute.store import latent_lookup

        try:  # after the engine: the VAE hash is checked in the dtype it trains in
            precomputed = latent_lookup(config.precomputed, decoder, encoder=encoder, size=config.output_size)
        except ConfigError as exc:
            raise ConfigError(f"decoder.precomputed: {exc}") from None
        encoder = None  # checked against the store; conditions come from there
    step_fn = DecoderStep(engine=engine, decoder=decoder, config=config, rank=rank, world=world, encoder=encoder,
                          precomputed=precomputed)
    summary = Trainer(engine=engine, data=build_mixture(data, config.batch_sizes, config.runtime.seed, rank, world),
                      step_fn=step_fn, out_dir=out, steps=config.steps, runtime=config.runtime, rank=rank,
                      world=world, stage="decoder", peak_flops=peak_flops(config.runtime.peak_tflops)).run()
    state = engine.consolidated_state_dict()
    export = out / "decoder"
    if rank == 0:
        decoder.load_state_dict(state)
        decoder.save_pretrained(export)
    engine_mod.barrier()
    return _finish("decoder", out, export, summary, rank, {"vae": vae} if vae else None)

