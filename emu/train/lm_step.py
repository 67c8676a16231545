"""One optimizer step of the multimodal LM stages (stage 1, stage 2, instruction tuning).

samples -> token sequences (emu.data.sequence, stage rules) -> packed rows (emu.data.packing)
-> micro-batches of `runtime.micro_batch_size` rows -> EmuModel forward/backward, accumulated.

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
(seed, step, sample key): a sample is written the same way whichever rank reads it.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from emu.data.packing import Batch, collate, pack
from emu.data.schema import Pair, Sample
from emu.data.sequence import SequenceBuilder, VisualSlot
from emu.model.emu import IGNORE, EmuModel
from emu.model.vision import preprocess
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


class LMStep:
    def __init__(self, *, engine: Engine, model: EmuModel, builder: SequenceBuilder, max_len: int, packing: bool,
                 micro_rows: int, pad_id: int, seed: int, rank: int, world: int, weights: LMWeights | None = None,
                 video_frames: int | None = None, flops: FlopModel | None = None,
                 embeddings: EmbeddingLookup | None = None):
        self.engine, self.model, self.builder = engine, model, builder
        self.max_len, self.packing, self.micro_rows, self.pad_id = max_len, packing, micro_rows, pad_id
        self.seed, self.rank, self.world = seed, rank, world
        self.weights = weights or LMWeights()
        self.video_frames = video_frames
        self.flops = flops
        self.embeddings = embeddings

    def sequences(self, samples: list[Sample], step: int):
        """The step's sequences; each sample's rng depends only on (seed, step, its key):
        resumable, reproducible, and the same on any rank and world size."""
        if self.video_frames:
            samples = [limit_frames(s, self.video_frames) for s in samples]
        return [seq for sample in samples
                for seq in self.builder.build(sample, random.Random(f"{self.seed}:{step}:{sample.key}"))]

    def batches(self, samples: list[Sample], step: int) -> tuple[list[Batch], list[int]]:
        """Micro-batches of packed (or one-per-row) sequences, and the sequence lengths."""
        sequences = self.sequences(samples, step)
        rows = pack(sequences, self.max_len) if self.packing else [[s] for s in sequences]
        batches = [collate(rows[i:i + self.micro_rows], self.pad_id) for i in range(0, len(rows), self.micro_rows)]
        return batches, [len(s.ids) for s in sequences]

    def __call__(self, samples: list[Sample], step: int) -> StepResult:
        batches, lengths = self.batches(samples, step)
        device = self.engine.device
        local_text = sum(int((b.targets != IGNORE).sum()) for b in batches)
        local_image = sum(self._regressed(b) for b in batches)
        n_text, n_image = all_reduce_sum([local_text, local_image], device=device)
        n_micro = int(all_reduce_max([len(batches)], device=device)[0])
        blanks = n_micro - len(batches)
        text_sum = image_sum = 0.0
        for batch in batches + [self._blank()] * blanks:
            out = self.engine.engine(**self._inputs(batch))
            # Parts without targets (anywhere, or in this micro-batch) enter with weight 0: their
            # modules still ran and must still send (zero) gradients.
            text_scale = self.weights.text * out.text_targets * self.world / n_text if n_text else 0.0
            image_scale = self.weights.image * out.image_targets * self.world / n_image if n_image else 0.0
            self.engine.backward(out.text_loss * text_scale + out.image_loss * image_scale)
            text_sum += float(out.text_loss.detach()) * out.text_targets
            image_sum += float(out.image_loss.detach()) * out.image_targets
        text_total, image_total, all_blanks = all_reduce_sum([text_sum, image_sum, blanks], device=device)
        text_loss = text_total / n_text if n_text else 0.0
        image_loss = image_total / n_image if n_image else 0.0
        losses = {"loss": self.weights.text * text_loss + self.weights.image * image_loss,
                  "text_loss": text_loss, "image_loss": image_loss}
        tokens = sum(b.real_tokens for b in batches)
        flops = 0.0
        if self.flops is not None:
            images = 0 if self.embeddings is not None else sum(len(b.image_slots) + len(b.frame_slots) for b in batches)
            flops = self.flops.step_flops(tokens, lengths, local_text, images)
        return StepResult(losses=losses, samples=len(samples), tokens=tokens,
                          padding=sum(b.padding_tokens for b in batches), flops=flops,
                          extra={"text_targets": n_text, "image_targets": n_image, "micro_batches": n_micro,
                                 "blank_micro_batches": all_blanks, "skipped_too_long": self.builder.skipped["too_long"],
                                 "truncated": sum(self.builder.truncated.values())})

    def _blank(self) -> Batch:
        """A one-token batch with nothing to score: what a rank with fewer micro-batches runs."""
        from emu.data.sequence import TokenSequence

        return collate([[TokenSequence(key="<blank>", data_type="text", ids=[self.pad_id], targets=[IGNORE],
                                       visuals=[])]], self.pad_id)

    def _regressed(self, batch: Batch) -> int:
        side_image = self.model.config.tokens_per_image(self.model.config.image_tokens_side)
        side_frame = self.model.config.tokens_per_image(self.model.config.video_tokens_side)
        return int(batch.image_regress.sum()) * side_image + int(batch.frame_regress.sum()) * side_frame

    def _inputs(self, batch: Batch) -> dict:
        device = self.engine.device
        inputs = {"input_ids": batch.input_ids.to(device), "text_targets": batch.targets.to(device),
                  "attention_mask": batch.attention_mask_for(self.model.config.lm.attn_implementation,
                                                             self.model.project_up.weight.dtype).to(device),
                  "position_ids": batch.position_ids.to(device),
                  "image_regress": batch.image_regress.to(device), "frame_regress": batch.frame_regress.to(device),
                  # Online encoding: the encoder runs in every forward, on a blank image if need be.
                  "encode_blank": self.embeddings is None}
        for kind, slots in (("image", batch.image_slots), ("frame", batch.frame_slots)):
            if not slots:
                continue
            if self.embeddings is not None:
                inputs[f"{kind}_embeds"] = self.embeddings(slots, kind).to(device)
            else:
                dtype = next(self.model.visual.parameters()).dtype
                inputs["images" if kind == "image" else "frames"] = self.pixels(slots).to(device, dtype)
        return inputs

    def pixels(self, slots: list[VisualSlot]) -> torch.Tensor:
        images = [Image.open(io.BytesIO(slot.data)) for slot in slots]
        return preprocess(images, self.model.visual.config)

