"""One optimizer step of the multimodal LM stages (stage 1, stage 2, instruction tuning).

samples -> token sequences (emu.data.sequence, stage rules) -> packed rows (emu.data.packing)
-> micro-batches of `runtime.micro_batch_size` rows -> EmuModel forward/backward, accumulated.

Two halves: `LMBatcher.prepare` does everything up to CPU tensors (tokenising, packing, image
decoding and resizing, precomputed-embedding lookups) and runs in the data loader's workers
(emu.train.loader), off the training thread; `LMStep` moves a prepared step to the device and
runs it. The batcher also finds, on the host, each micro-batch's supervised and visual positions
(emu.model.emu.SequenceLayout), so neither weighting the micro-batches nor the model's forward
reads anything back from the device: the only syncs are the step's collectives and its logged
losses, once per step.

Each micro-batch's loss is weighted by its share of the whole step's targets, summed over all
ranks: text CE by (its text targets / all text targets), image MSE by (its regressed embeddings /
all regressed embeddings), times the world size because DeepSpeed averages gradients over
ranks. The step's gradient is therefore that of the exact token mean over the global batch, however
the rows fall into micro-batches and ranks, which is what lets a packed step equal an unpacked one,
and a run on several ranks equal one rank on the same global batch.

Ranks pack their own samples, so they may need different numbers of micro-batches; every rank
runs the largest number, the extra ones a one-token blank batch with weight 0: ZeRO-2 reduces
gradients at every backward and ZeRO-3 gathers parameters at every forward, so ranks must run
the same number of them (DESIGN.md multi-rank rules; EmuModel calls every module in every forward).
Random choices (image/text order, entity dropping) come from a generator per sample, seeded by
(seed, step, sample source and key): a sample is written the same way whichever rank reads it.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from emu.data.packing import Batch, attention_mask_of, collate, micro_batches, pack
from emu.data.schema import Pair, Sample
from emu.data.sequence import SequenceBuilder, TokenSequence, VisualSlot
from emu.model.config import VisionConfig
from emu.data.tokenizer import GIMG, IMAGE
from emu.model.emu import IGNORE, SequenceLayout, VisualTokenIds
from emu.model.vision import resize_images, resize_pixels, stack_pixels
from emu.train.engine import Engine, all_reduce_max, all_reduce_sum
from emu.train.metrics import FlopModel
from emu.train.trainer import StepResult

#: Precomputed embeddings: (slots, "image" | "frame") -> (N, n, D_vis), or None to encode online.
EmbeddingLookup = Callable[[list[VisualSlot], str], torch.Tensor]


@dataclass
class LMWeights:
    text: float = 1.0
    image: float = 1.0


def limit_frames(sample: Sample, frames: int) -> Sample:
    """Keep `frames` frames of a video pair, spread uniformly (Emu2 samples 8 per video, App. B.1)."""
    if isinstance(sample, Pair) and sample.media == "video" and len(sample.images) > frames:
        n = len(sample.images)
        picks = [(2 * i + 1) * n // (2 * frames) for i in range(frames)]
        return Pair(key=sample.key, images=[sample.images[i] for i in picks], text=sample.text, media="video",
                    source=sample.source, meta=sample.meta)
    return sample


@dataclass
class MicroBatch:
    """One micro-batch on the CPU: EmuModel.forward's tensor inputs but the attention mask,
    which `model_inputs` builds on the device from the rows' sequence numbers (an (R, L, L) mask
    would cost the loader more to build and ship than the rest of the micro-batch), and where its
    targets are. Pixels may come at their stored size and precomputed embeddings in their stored
    dtype: `model_inputs` resizes and casts them on the device (LMBatcher.resize_on_device)."""

    inputs: dict[str, torch.Tensor]
    segments: torch.Tensor  # (R, L) sequence number of each position (emu.data.packing)
    layout: SequenceLayout
    attn_implementation: str
    mask_dtype: torch.dtype
    pixel_size: int = 0  # the side `images` and `frames` enter the encoder at

    def model_inputs(self, device: torch.device | str) -> dict[str, Any]:
        """The forward's keyword arguments on `device`, mask and layout included."""
        moved: dict[str, Any] = {name: t.to(device, non_blocking=True) for name, t in self.inputs.items()}
        for name in ("images", "frames"):
            if name in moved and self.pixel_size:
                moved[name] = resize_pixels(moved[name], self.pixel_size)
        for name in ("image_embeds", "frame_embeds"):
            if name in moved:
                moved[name] = moved[name].float()  # stored bf16 ships at half the bytes; bf16 -> fp32 is exact
        mask = attention_mask_of(self.segments.to(device, non_blocking=True), self.attn_implementation,
                                 self.mask_dtype)
        if mask is not None:  # none for flex_attention: the position ids carry the packing
            moved["attention_mask"] = mask
        moved["layout"] = self.layout.to(device, non_blocking=True)
        return moved

    @property
    def text_targets(self) -> int:
        """Supervised text targets."""
        return len(self.layout.text_positions)

    @property
    def image_targets(self) -> int:
        """Regressed visual embeddings."""
        return len(self.layout.image_regressed) + len(self.layout.frame_regressed)


@dataclass
class PreparedStep:
    """A rank's step, ready for the device: micro-batches, and what the step reports."""

    micro: list[MicroBatch]
    samples: int
    tokens: int                 # positions of sequences (not padding)
    padding: int
    lengths: list[int]          # sequence lengths (the attention FLOPs)
    images: int                 # images and frames encoded online (0 when precomputed)
    skipped_too_long: int = 0   # samples left out by sequence.too_long=skip, this step
    truncated: int = 0          # chats truncated at max_len, this step
    keys: list[str] = field(default_factory=list)

    def pin_memory(self) -> PreparedStep:
        """Page-locked copies (the DataLoader calls this with pin_memory=True): the copy to the
        GPU then runs asynchronously."""
        for micro in self.micro:
            micro.inputs = {k: v.pin_memory() for k, v in micro.inputs.items()}
            micro.segments = micro.segments.pin_memory()
            micro.layout = micro.layout.pin_memory()
        return self


class LMBatcher:
    """The CPU half of an LM step (module docstring). Holds no model: it runs in loader workers."""

    def __init__(self, builder: SequenceBuilder, *, max_len: int, packing: bool, micro_rows: int, pad_id: int,
                 seed: int, vision: VisionConfig, attn_implementation: str,
                 mask_dtype: torch.dtype, image_size: Callable[[int], int] | None = None,
                 video_frames: int | None = None, embeddings: EmbeddingLookup | None = None,
                 max_visuals: int = 0, resize_on_device: bool = False):
        self.builder = builder
        self.token_ids = VisualTokenIds(image=builder.tokenizer.convert_tokens_to_ids(IMAGE),
                                        frame=builder.tokenizer.convert_tokens_to_ids(GIMG))
        self.max_len, self.packing, self.micro_rows, self.pad_id = max_len, packing, micro_rows, pad_id
        self.seed = seed
        self.vision = vision
        self.attn_implementation, self.mask_dtype = attn_implementation, mask_dtype
        self.image_size = image_size or (lambda step: vision.image_size)
        self.video_frames = video_frames
        self.embeddings = embeddings
        #: Images and frames per micro-batch at most (0: no cap): the encoder's batch (packing).
        self.max_visuals = max_visuals
        #: Ship a micro-batch's images at their stored size when they share one, resized on the
        #: device (emu.model.vision.resize_pixels): on a GPU the bicubic resize, most of the
        #: loader's work per image, costs nothing; on a CPU it is cheaper here, in PIL.
        self.resize_on_device = resize_on_device

    def sequences(self, samples: list[Sample], step: int) -> list[TokenSequence]:
        """The step's sequences; each sample's rng depends only on (seed, step, where the sample
        comes from and its key; keys alone repeat across datasets): resumable, reproducible, and
        the same on any rank and world size."""
        if self.video_frames:
            samples = [limit_frames(s, self.video_frames) for s in samples]
        built = self.builder.build_all(
            [(sample, random.Random(f"{self.seed}:{step}:{sample.source}:{sample.key}")) for sample in samples])
        return [seq for sequences in built for seq in sequences]

    def batches(self, samples: list[Sample], step: int) -> tuple[list[Batch], list[int]]:
        """Micro-batches of packed (or one-per-row) sequences, and the sequence lengths. Packed for
        flex_attention, a micro-batch is one varlen row of up to micro_rows x max_len tokens:
        the same token budget as micro_rows rows, without their padding (emu.data.packing)."""
        sequences = self.sequences(samples, step)
        if self.packing and self.attn_implementation == "flex_attention":
            groups = [[row] for row in pack(sequences, self.micro_rows * self.max_len, self.max_visuals)]
        else:
            rows = pack(sequences, self.max_len, self.max_visuals) if self.packing else [[s] for s in sequences]
            groups = micro_batches(rows, self.micro_rows, self.max_visuals)
        return [collate(group, self.pad_id) for group in groups], [len(s.ids) for s in sequences]

    def prepare(self, samples: list[Sample], step: int) -> PreparedStep:
        skipped, truncated = self.builder.skipped["too_long"], sum(self.builder.truncated.values())
        batches, lengths = self.batches(samples, step)
        size = self.image_size(step)
        micro = [self.micro_batch(b, size) for b in batches]
        return PreparedStep(
            micro=micro, samples=len(samples), tokens=sum(b.real_tokens for b in batches),
            padding=sum(b.padding_tokens for b in batches), lengths=lengths,
            images=0 if self.embeddings is not None else sum(len(b.image_slots) + len(b.frame_slots) for b in batches),
            skipped_too_long=self.builder.skipped["too_long"] - skipped,
            truncated=sum(self.builder.truncated.values()) - truncated, keys=[s.key for s in samples])

    def micro_batch(self, batch: Batch, image_size: int) -> MicroBatch:
        inputs = {"input_ids": batch.input_ids, "text_targets": batch.targets, "position_ids": batch.position_ids}
        for kind, slots in (("image", batch.image_slots), ("frame", batch.frame_slots)):
            if not slots:
                continue
            if self.embeddings is not None:
                inputs[f"{kind}_embeds"] = self.embeddings(slots, kind)
            else:
                inputs["images" if kind == "image" else "frames"] = self.pixels(slots, image_size)
        layout = SequenceLayout.of(batch.input_ids, batch.targets, self.token_ids, batch.image_regress,
                                   batch.frame_regress)
        return MicroBatch(inputs=inputs, segments=batch.segments, layout=layout,
                          attn_implementation=self.attn_implementation, mask_dtype=self.mask_dtype,
                          pixel_size=image_size)

    def pixels(self, slots: list[VisualSlot], image_size: int | None = None) -> torch.Tensor:
        """uint8 pixels of the slots' images at `image_size` (default: the encoder's), or at their
        stored size (resize_on_device, when they share one); EmuModel normalises them on the device."""
        images = [Image.open(io.BytesIO(slot.data)) for slot in slots]
        if self.resize_on_device and len({image.size for image in images}) == 1:
            return stack_pixels(images)
        return resize_images(images, image_size or self.vision.image_size)

    def blank(self) -> MicroBatch:
        """A one-token batch with nothing to score: what a rank with fewer micro-batches runs."""
        batch = collate([[TokenSequence(key="<blank>", data_type="text", ids=[self.pad_id], targets=[IGNORE],
                                        visuals=[])]], self.pad_id)
        return self.micro_batch(batch, self.vision.image_size)


class LMStep:
    """The device half of an LM step: runs a PreparedStep through the engine (module docstring)."""

    def __init__(self, *, engine: Engine, batcher: LMBatcher, world: int, weights: LMWeights | None = None,
                 flops: FlopModel | None = None, encode_blank: bool = False):
        self.engine, self.batcher, self.world = engine, batcher, world
        #: Run the encoder on a blank image in image-free micro-batches: needed when the encoder
        #: trains (ZeRO-2 reduces its gradients per backward) or is partitioned (ZeRO-3 gathers it
        #: per call), wasted work otherwise (module docstring).
        self.encode_blank = encode_blank
        self.weights = weights or LMWeights()
        self.flops = flops
        self.skipped_too_long = self.truncated = 0  # this run's totals, all ranks

    def prepare(self, samples: list[Sample], step: int) -> PreparedStep:
        return self.batcher.prepare(samples, step)

    def __call__(self, prepared: PreparedStep, step: int) -> StepResult:
        device = self.engine.device
        local_text = sum(m.text_targets for m in prepared.micro)
        n_text, n_image = all_reduce_sum([local_text, sum(m.image_targets for m in prepared.micro)], device=device)
        n_micro = int(all_reduce_max([len(prepared.micro)], device=device)[0])
        blanks = n_micro - len(prepared.micro)
        # Logged losses stay on the device until the step's end: no sync per micro-batch.
        text_sum = torch.zeros((), dtype=torch.float64, device=device)
        image_sum = torch.zeros((), dtype=torch.float64, device=device)
        for micro in prepared.micro + [self.batcher.blank() for _ in range(blanks)]:
            out = self.engine.engine(**micro.model_inputs(device), encode_blank=self.encode_blank)
            # Parts without targets (anywhere, or in this micro-batch) enter with weight 0: their
            # modules still ran and must still send (zero) gradients.
            text_scale = self.weights.text * micro.text_targets * self.world / n_text if n_text else 0.0
            image_scale = self.weights.image * micro.image_targets * self.world / n_image if n_image else 0.0
            self.engine.backward(out.text_loss * text_scale + out.image_loss * image_scale)
            text_sum += out.text_loss.detach().double() * micro.text_targets
            image_sum += out.image_loss.detach().double() * micro.image_targets
        text_total, image_total, all_blanks, skipped, truncated = all_reduce_sum(
            [float(text_sum), float(image_sum), blanks, prepared.skipped_too_long, prepared.truncated], device=device)
        self.skipped_too_long += int(skipped)
        self.truncated += int(truncated)
        text_loss = text_total / n_text if n_text else 0.0
        image_loss = image_total / n_image if n_image else 0.0
        losses = {"loss": self.weights.text * text_loss + self.weights.image * image_loss,
                  "text_loss": text_loss, "image_loss": image_loss}
        flops = vision_flops = 0.0
        if self.flops is not None:
            flops = self.flops.step_flops(prepared.tokens, prepared.lengths, local_text, prepared.images)
            vision_flops = self.flops.vision_flops(prepared.images)
        return StepResult(losses=losses, samples=prepared.samples, tokens=prepared.tokens,
                          padding=prepared.padding, flops=flops,
                          extra={"vision_step_tflops": vision_flops / 1e12,  # this rank's; step_tflops: all ranks
                                 "text_targets": n_text, "image_targets": n_image, "micro_batches": n_micro,
                                 "blank_micro_batches": all_blanks, "skipped_too_long": self.skipped_too_long,
                                 "truncated": self.truncated})
