"""Optimisation settings of the four training stages (Emu2 §2.2.2, §2.2.3, §2.3; Tables 6–9).

Each stage has its own dataclass; the shared pieces (optimizer, schedule, runtime) are small
dataclasses they embed. The `emu2-37b` preset fills them with the paper's values; where the
paper is ambiguous the preset says so in a comment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from emu.errors import ConfigError


@dataclass
class OptimizerConfig:
    """AdamW hyper-parameters. Emu2 pretraining: betas (0.9, 0.95), eps 1e-6, clip 5.0 (Table 6)."""

    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-6
    weight_decay: float = 0.0
    grad_clip: float = 5.0  # max global grad norm; 0 disables clipping

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
    """How a stage runs: precision, ZeRO stage, accumulation, checkpoint cadence."""

    precision: Literal["fp32", "bf16"] = "fp32"
    zero_stage: int = 0
    micro_batch_size: int = 4  # per process; global batch = micro x accumulation x processes
    gradient_checkpointing: bool = False
    checkpoint_every: int = 0  # steps; 0 = only at the end (and on SIGTERM)
    keep_checkpoints: int = 2
    log_every: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"runtime.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        for name in ("micro_batch_size", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"runtime.{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"runtime.checkpoint_every must be >= 0, got {self.checkpoint_every}")


def _check_steps_and_batches(section: str, steps: int, batch_sizes: dict[str, int]) -> None:
    if steps < 1:
        raise ConfigError(f"{section}.steps must be >= 1, got {steps}")
    if not batch_sizes:
        raise ConfigError(f"{section}.batch_sizes must name at least one data type")
    for name, size in batch_sizes.items():
        if size < 0:
            raise ConfigError(f"{section}.batch_sizes.{name} must be >= 0, got {size}")
    if sum(batch_sizes.values()) == 0:
        raise ConfigError(f"{section}.batch_sizes: at least one data type needs a batch size > 0")


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
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        _check_steps_and_batches("stage1", self.steps, self.batch_sizes)
        for name in ("lr_projection", "lr_lm", "lr_encoder"):
            if getattr(self, name) < 0:
                raise ConfigError(f"stage1.{name} must be >= 0, got {getattr(self, name)}")
        last = 0
        for entry in self.resolution_schedule:
            if len(entry) != 2 or entry[0] <= last or entry[1] < 1:
                raise ConfigError("stage1.resolution_schedule must be [[step, image_size], ...] with "
                                  f"increasing steps > 0, got {self.resolution_schedule}")
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
    image_text_order_p: float = 0.5  # probability the image comes before its text (Emu2 App. B.1)
    text_loss_weight: float = 1.0
    image_loss_weight: float = 1.0
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        _check_steps_and_batches("stage2", self.steps, self.batch_sizes)
        if not 0.0 <= self.image_text_order_p <= 1.0:
            raise ConfigError(f"stage2.image_text_order_p must be in [0, 1], got {self.image_text_order_p}")


@dataclass
class DecoderTrainConfig:
    """Visual decoder as an image autoencoder; encoder and VAE frozen (Emu2 §2.2.3, Table 7)."""

    steps: int = 100
    batch_size: int = 8
    lr: float = 1e-4
    image_size: int = 448        # encoder input resolution
    output_size: int = 1024      # decoder output resolution
    condition_drop: float = 0.1  # probability of dropping the visual condition (for CFG)
    noise_offset: float = 0.1
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(
        betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, grad_clip=1.0))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(decay="linear", warmup="log"))
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError(f"decoder.steps and decoder.batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        if not 0.0 <= self.condition_drop < 1.0:
            raise ConfigError(f"decoder.condition_drop must be in [0, 1), got {self.condition_drop}")
        if self.noise_offset < 0:
            raise ConfigError(f"decoder.noise_offset must be >= 0, got {self.noise_offset}")


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
    entity_drop_p: float = 0.0   # gen: probability of dropping an entity's tokens (paper gives none)
    #: System message per data category (Emu2 App. C.1).
    system_messages: dict[str, str] = field(default_factory=lambda: {
        "academic": "You are a helpful assistant, dedicated to provide concise and efficient answers.",
        "chat": "You are a helpful assistant, dedicated to delivering comprehensive and meticulous responses.",
    })
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(betas=(0.9, 0.98)))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(warmup_steps=100))
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        _check_steps_and_batches("instruct", self.steps, self.batch_sizes)
        if self.image_tokens_side < 1 or self.video_tokens_side < 1:
            raise ConfigError("instruct.image_tokens_side and instruct.video_tokens_side must be >= 1")
        if not 0.0 <= self.entity_drop_p < 1.0:
            raise ConfigError(f"instruct.entity_drop_p must be in [0, 1), got {self.entity_drop_p}")
