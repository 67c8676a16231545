"""Settings of the four training stages (Emu2 §2.2.2, §2.2.3, §2.3; Tables 6–9).

Each stage has its own dataclass; the shared pieces (optimizer, schedule, runtime, sequences)
are small dataclasses they embed. The `emu2-37b` preset fills them with the paper's values;
where the paper is ambiguous the preset says so in a comment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from emu.errors import ConfigError

#: Parts of an EmuModel that a stage may train (emu.model.emu attribute names).
MODULES = ("visual", "cformer", "project_up", "lm", "project_down")


@dataclass
class OptimizerConfig:
    """AdamW hyper-parameters. Emu2 pretraining: betas (0.9, 0.95), eps 1e-6, clip 5.0 (Table 6)."""

    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-6
    weight_decay: float = 0.0
    grad_clip: float = 5.0  # max global grad norm; 0 disables clipping
    #: torch's fused AdamW kernel (one launch for all parameters) on CUDA; ignored on CPU.
    fused: bool = False

    def __post_init__(self) -> None:
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optimizer.betas must be two numbers in [0, 1), got {self.betas}")
        if self.eps <= 0:
            raise ConfigError(f"optimizer.eps must be > 0, got {self.eps}")
        if self.weight_decay < 0:
            raise ConfigError(f"optimizer.weight_decay must be >= 0, got {self.weight_decay}")
        if self.grad_clip < 0:
            raise ConfigError(f"optimizer.grad_clip must be >= 0 (0 disables), got {self.grad_clip}")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: warmup then decay to `min_lr_ratio` x peak at the last step."""

    decay: Literal["cosine", "linear", "constant"] = "cosine"
    warmup: Literal["linear", "log"] = "linear"  # Emu2's decoder uses a log warm-up (§2.2.3)
    warmup_ratio: float = 0.0  # fraction of steps; ignored when warmup_steps > 0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"schedule.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_steps < 0:
            raise ConfigError(f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"schedule.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class RuntimeConfig:
    """How a stage runs: precision, ZeRO stage, micro-batching, checkpoint cadence, logging."""

    precision: Literal["fp32", "bf16"] = "fp32"
    zero_stage: int = 0
    #: ZeRO-3: parameters of at most this many elements stay whole on every rank instead of being
    #: gathered at each use (DeepSpeed's stage3_param_persistence_threshold, same default); 0
    #: partitions every parameter (the multi-rank tests use it, so every gather must line up).
    zero3_persistence_threshold: int = 100_000
    micro_batch_size: int = 4  # packed rows per forward/backward; a step accumulates as many as it needs
    #: Images and video frames per micro-batch at most (0: no cap). With the encoder running
    #: online (stage 1), their count bounds its activation memory whatever the token count;
    #: a row or sequence holding more still runs, alone (emu.data.packing).
    micro_batch_images: int = 0
    gradient_checkpointing: bool = False
    #: torch.compile each LM decoder layer and encoder block (torchtitan's per-block compile:
    #: small graphs, compiled once, reused by every layer of the same shape). Off by default:
    #: not yet measured on a GPU; the first steps pay the compile time.
    compile: bool = False
    #: Attention over packed rows. sdpa / eager: a dense (rows, 1, L, L) block-diagonal mask
    #: (the reference; it keeps SDPA off its flash kernel). flex_attention: no dense mask;
    #: transformers derives a block mask from the position ids (which restart at each packed
    #: sequence) and skips the blocks it masks out; a packed micro-batch is then one varlen row
    #: of up to micro_batch_size x max_len tokens, with no padding (emu.data.packing). CUDA only
    #: (FlexAttention has no backward on CPU); exact on CPU in forward (tested), not yet measured
    #: on a GPU, hence not the default.
    attention: Literal["sdpa", "eager", "flex_attention"] = "sdpa"
    checkpoint_every: int = 0  # steps; 0 = only at the end (and on SIGTERM)
    keep_checkpoints: int = 2
    log_every: int = 1
    #: Data loader processes preparing steps ahead (reading, decoding, tokenising, packing;
    #: emu.train.loader); 0 prepares each step in the training process.
    loader_workers: int = 0
    #: Steps each loader worker prepares ahead.
    loader_prefetch: int = 2
    seed: int = 0
    #: Steps in a row whose loss may be non-finite (NaN or inf) before training stops with an
    #: error (0: the first one stops it). No checkpoint is written then: it would hold the diverged
    #: weights; the last one before stays the one to resume from.
    nonfinite_patience: int = 0
    peak_tflops: float = 0.0   # per-device peak for MFU; 0 = a known GPU's bf16 peak, none on CPU
    progress: bool = True      # tqdm bar with ETA on rank 0

    def __post_init__(self) -> None:
        if self.attention not in ("sdpa", "eager", "flex_attention"):
            raise ConfigError(f"runtime.attention must be sdpa, eager or flex_attention, got {self.attention!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"runtime.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.loader_workers < 0:
            raise ConfigError(f"runtime.loader_workers must be >= 0 (0 = in the training process), got {self.loader_workers}")
        for name in ("micro_batch_size", "keep_checkpoints", "log_every", "loader_prefetch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"runtime.{name} must be >= 1, got {getattr(self, name)}")
        if self.micro_batch_images < 0:
            raise ConfigError(f"runtime.micro_batch_images must be >= 0 (0 = no cap), got {self.micro_batch_images}")
        if self.zero3_persistence_threshold < 0:
            raise ConfigError(f"runtime.zero3_persistence_threshold must be >= 0, got {self.zero3_persistence_threshold}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"runtime.checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.nonfinite_patience < 0:
            raise ConfigError(f"runtime.nonfinite_patience must be >= 0, got {self.nonfinite_patience}")
        if self.peak_tflops < 0 or not math.isfinite(self.peak_tflops):
            raise ConfigError(f"runtime.peak_tflops must be >= 0, got {self.peak_tflops}")


@dataclass
class SequenceConfig:
    """How samples become LM rows (emu.data.sequence, emu.data.packing)."""

    #: Tokens per row, visual tokens included. The default, 1,024, is the MMC4 subsequence length
    #: L (and the tiny preset's LM context); the emu2-37b preset uses 2,048, LLaMA-33B's context:
    #: the length of Emu2's Pile text chunks (App. A.1) and where Emu2-Chat truncates (§2.3.1).
    #: Longer samples are chunked (text), split (interleaved) or truncated (chat) to it
    #: (emu.data.sequence).
    max_len: int = 1024
    packing: bool = True       # several sequences per row, block-diagonal attention
    #: A sequence that cannot be chunked or truncated to max_len (an image block alone longer
    #: than a row, a chat with no answer token within max_len, a pair, video, grounded or gen
    #: sequence over it): "error" stops the stage (before the first step when the manifests
    #: show it, emu.train.preflight), "skip" leaves the sample out and counts it.
    too_long: Literal["error", "skip"] = "error"

    def __post_init__(self) -> None:
        if self.max_len < 8:
            raise ConfigError(f"sequence.max_len must be >= 8, got {self.max_len}")


def _check_common(section: str, steps: int, batch_sizes: dict[str, int], allowed: tuple[str, ...],
                  image_size: int) -> None:
    if steps < 1:
        raise ConfigError(f"{section}.steps must be >= 1, got {steps}")
    if image_size < 1:
        raise ConfigError(f"{section}.image_size must be >= 1, got {image_size}")
    if not batch_sizes:
        raise ConfigError(f"{section}.batch_sizes must name at least one data type")
    for name, size in batch_sizes.items():
        if name not in allowed:
            raise ConfigError(f"{section}.batch_sizes.{name}: {section} does not train on {name!r}; "
                              f"its data types: {', '.join(allowed)}")
        if size < 0:
            raise ConfigError(f"{section}.batch_sizes.{name} must be >= 0, got {size}")
    if sum(batch_sizes.values()) == 0:
        raise ConfigError(f"{section}.batch_sizes: at least one data type needs a batch size > 0")


def _check_trainable(section: str, trainable: list[str], frozen: tuple[str, ...], why: str) -> None:
    for name in trainable:
        if name not in MODULES:
            raise ConfigError(f"{section}.trainable: unknown module {name!r}; modules: {', '.join(MODULES)}")
        if name in frozen:
            raise ConfigError(f"{section}.trainable lists {name!r}, but {section} keeps it frozen ({why}); "
                              f"remove it from {section}.trainable")
    if not trainable:
        raise ConfigError(f"{section}.trainable is empty: nothing would train")


@dataclass
class Stage1Config:
    """Stage-1 pretraining: pairs only, captioning loss, encoder + projection + LM trained (Emu2 §2.2.2)."""

    steps: int = 100
    #: Global batch size per data type (Emu2: 6,144 image-text, 768 video-text).
    batch_sizes: dict[str, int] = field(default_factory=lambda: {"image_text": 8, "video_text": 2})
    #: Peak learning rate per parameter group (Emu2: projection 1e-4, LM 3e-5, encoder 5e-5).
    lr_projection: float = 1e-4
    lr_lm: float = 3e-5
    lr_encoder: float = 5e-5
    image_size: int = 224
    #: Raise the resolution mid-schedule: [[step, image_size], ...] (Emu2 restarts at 448 px
    #: for 4,000 more iterations after 35,200 at 224 px).
    resolution_schedule: list[list[int]] = field(default_factory=list)
    #: Restart warmup and decay when the resolution rises, as Emu2 restarts training at 448 px.
    restart_schedule_on_resize: bool = True
    video_frames: int = 8  # frames sampled per video (Emu2 App. B.1)
    trainable: list[str] = field(default_factory=lambda: ["visual", "cformer", "project_up", "lm"])
    #: Model folder or s3:// URI to start from; empty: build from the `model` section.
    init: str = ""
    #: Tokenizer folder or s3:// URI for a model built from scratch; empty: the pretrained LM's
    #: own (model.lm.pretrained), or without one a byte-level BPE of `tokenizer_vocab` tokens
    #: trained on the training texts (tiny and synthetic runs). A tokenizer with fewer tokens
    #: than a pretrained LM has embeddings is refused (it would shrink the LM's vocabulary).
    tokenizer: str = ""
    tokenizer_vocab: int = 1024
    sequence: SequenceConfig = field(default_factory=SequenceConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        _check_common("stage1", self.steps, self.batch_sizes, ("image_text", "video_text"), self.image_size)
        _check_trainable("stage1", self.trainable, (), "")
        for name in ("lr_projection", "lr_lm", "lr_encoder"):
            if getattr(self, name) < 0:
                raise ConfigError(f"stage1.{name} must be >= 0, got {getattr(self, name)}")
        if self.video_frames < 1:
            raise ConfigError(f"stage1.video_frames must be >= 1, got {self.video_frames}")
        last = 0
        for entry in self.resolution_schedule:
            if len(entry) != 2 or not last < entry[0] < self.steps or entry[1] < 1:
                raise ConfigError("stage1.resolution_schedule must be [[step, image_size], ...] with "
                                  f"increasing steps in (0, stage1.steps), got {self.resolution_schedule}")
            last = entry[0]


@dataclass
class Stage2Config:
    """Stage-2 pretraining: encoder frozen; text CE + visual L2 on a mixture (Emu2 §2.2.2)."""

    steps: int = 100
    #: Emu2: 12,800 image-text, 6,400 video-text, 3,200 interleaved, 800 text-only; grounded pairs
    #: have no number of their own in the paper.
    batch_sizes: dict[str, int] = field(default_factory=lambda: {
        "image_text": 8, "video_text": 2, "interleaved": 2, "video_interleaved": 2, "grounded": 4, "text": 2})
    lr: float = 1e-5
    image_size: int = 448
    #: Probability that an image comes before its text, else after it (Emu2 App. A.1, B.1: 0.5): a
    #: pair's caption, an interleaved image's sentence, a video frame's subtitle; one draw each.
    image_text_order_p: float = 0.5
    text_loss_weight: float = 1.0
    image_loss_weight: float = 1.0
    trainable: list[str] = field(default_factory=lambda: ["project_up", "lm", "project_down"])
    #: Model folder or s3:// URI to start from (stage 1's export).
    init: str = ""
    #: Use precomputed visual embeddings (emu precompute) instead of encoding online.
    precomputed: str = ""
    sequence: SequenceConfig = field(default_factory=SequenceConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        _check_common("stage2", self.steps, self.batch_sizes, (
            "image_text", "video_text", "interleaved", "video_interleaved", "grounded", "text"), self.image_size)
        _check_trainable("stage2", self.trainable, ("visual", "cformer"), "Emu2 §2.2.2 freezes the visual encoder")
        if not 0.0 <= self.image_text_order_p <= 1.0:
            raise ConfigError(f"stage2.image_text_order_p must be in [0, 1], got {self.image_text_order_p}")
        if self.text_loss_weight < 0 or self.image_loss_weight < 0:
            raise ConfigError("stage2.text_loss_weight and stage2.image_loss_weight must be >= 0")


@dataclass
class DecoderTrainConfig:
    """Visual decoder as an image autoencoder; encoder and VAE frozen (Emu2 §2.2.3, Table 7)."""

    steps: int = 100
    #: Global batch per data type: the decoder learns from the images of image-text pairs.
    batch_sizes: dict[str, int] = field(default_factory=lambda: {"image_text": 8})
    lr: float = 1e-4
    image_size: int = 448        # encoder input resolution
    output_size: int = 1024      # decoder output resolution
    condition_drop: float = 0.1  # probability of dropping the visual condition (for CFG)
    noise_offset: float = 0.1
    #: Emu model folder or s3:// URI whose (frozen) encoder provides the conditions (stage 1's export).
    encoder: str = ""
    #: Decoder folder to start from (e.g. a converted SDXL); empty: build from `visual_decoder`.
    init: str = ""
    #: SDXL's augmentation, drawn anew per image and step: ratio-preserving random scaling and a
    #: random square crop, passed to the UNet as size/crop conditions (Emu2 App. B.3.1), and latents
    #: drawn from the VAE posterior (SDXL training). False: the deterministic view `emu precompute`
    #: stores, the centred crop of the image scaled to `output_size` on its short side and the
    #: posterior mode, so that online encoding gives exactly the precomputed inputs.
    augment: bool = True
    #: Precompute output folder (`emu precompute` with precompute.latents=true, this decoder's VAE
    #: and the `encoder` model) to read latents, crop embeddings and time ids from instead of
    #: running the frozen encoder and VAE every step: both are frozen (Emu2 §2.2.3), so their outputs
    #: are a fixed function of each image. The store holds one center crop per image, so it needs
    #: `augment` false. Empty: encode online, in micro-batches of runtime.micro_batch_size.
    precomputed: str = ""
    #: Steps of the VAE phase that runs before the UNet's when no pretrained decoder is named
    #: (`init` empty): a random VAE decodes every latent to noise, so the platform trains one on the
    #: stage's images first, as latent diffusion trains its autoencoder before the UNet (LDM §3.1;
    #: emu.model.vae). Ignored with `init`: a pretrained decoder brings its trained VAE (Emu2 §2.2.3).
    vae_steps: int = 1000
    vae_lr: float = 1e-4
    #: Weight of the KL term of the VAE loss (LDM's kl_weight).
    vae_kl_weight: float = 1e-6
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(
        betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, grad_clip=1.0))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(decay="linear", warmup="log"))
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        if self.vae_steps < 0:
            raise ConfigError(f"decoder.vae_steps must be >= 0, got {self.vae_steps}")
        if not self.vae_lr > 0:
            raise ConfigError(f"decoder.vae_lr must be > 0, got {self.vae_lr}")
        if not self.vae_kl_weight >= 0:
            raise ConfigError(f"decoder.vae_kl_weight must be >= 0, got {self.vae_kl_weight}")
        _check_common("decoder", self.steps, self.batch_sizes, ("image_text", "grounded", "edit", "chat"),
                      self.image_size)
        if self.output_size < 8:
            raise ConfigError(f"decoder.output_size must be >= 8, got {self.output_size}")
        if not 0.0 <= self.condition_drop < 1.0:
            raise ConfigError(f"decoder.condition_drop must be in [0, 1), got {self.condition_drop}")
        if self.noise_offset < 0:
            raise ConfigError(f"decoder.noise_offset must be >= 0, got {self.noise_offset}")
        if self.precomputed and self.augment:
            raise ConfigError(f"decoder.augment must be false with decoder.precomputed ({self.precomputed}): the "
                              "precompute stores one center crop per image and the VAE posterior mode, there is "
                              "nothing to augment; set decoder.augment=false (or clear decoder.precomputed to "
                              "encode online with SDXL's random scale-and-crop)")


@dataclass
class InstructConfig:
    """Instruction tuning: `chat` (answers-only loss, 16x16 tokens) or `gen` (last-image regression)."""

    mode: Literal["chat", "gen"] = "chat"
    steps: int = 100
    batch_sizes: dict[str, int] = field(default_factory=lambda: {"chat": 8})
    lr: float = 1e-5
    image_size: int = 448
    image_tokens_side: int = 16  # Emu2-Chat pools to 16x16 = 256 tokens per image (§2.3.1)
    video_tokens_side: int = 8   # video frames stay at 8x8 = 64 (official chat.py v_query=64)
    entity_drop_p: float = 0.0   # gen: probability of dropping a condition segment (paper gives none)
    #: System message per data category (Emu2 App. C.1).
    system_messages: dict[str, str] = field(default_factory=lambda: {
        "academic": "You are a helpful assistant, dedicated to provide concise and efficient answers.",
        "chat": "You are a helpful assistant, dedicated to delivering comprehensive and meticulous responses.",
    })
    trainable: list[str] = field(default_factory=lambda: ["project_up", "lm", "project_down"])
    init: str = ""
    precomputed: str = ""
    sequence: SequenceConfig = field(default_factory=SequenceConfig)
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(betas=(0.9, 0.98)))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(warmup_steps=100))
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        allowed = ("chat", "academic") if self.mode == "chat" else ("edit", "image_text", "grounded")
        _check_common("instruct", self.steps, self.batch_sizes, allowed, self.image_size)
        _check_trainable("instruct", self.trainable, ("visual", "cformer"),
                         "Emu2 §2.3 freezes the visual encoder in instruction tuning")
        if self.image_tokens_side < 1 or self.video_tokens_side < 1:
            raise ConfigError("instruct.image_tokens_side and instruct.video_tokens_side must be >= 1")
        if not 0.0 <= self.entity_drop_p < 1.0:
            raise ConfigError(f"instruct.entity_drop_p must be in [0, 1), got {self.entity_drop_p}")

