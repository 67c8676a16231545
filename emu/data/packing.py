"""Packing: whole token sequences into fixed-length rows, and rows into model batches.

Several short sequences share one row of the batch instead of each being padded to the longest:
less compute is spent on padding. Packing must not change what the model computes for any
sequence, so a packed batch carries

  * which sequence each position belongs to, from which `Batch.attention_mask` builds the
    block-diagonal causal mask (R, 1, L, L), True = may attend, when an attention kernel needs
    one: a token sees only the earlier tokens of its own sequence; a padding token sees only
    itself (no all-False row, which would give NaN in softmax attention). It is built on demand:
    a varlen micro-batch for flex_attention never needs it, and shipping L x L booleans from the
    loader's workers would cost more than the row itself;
  * position ids that restart at 0 for each sequence (rotary embeddings see the same positions as
    for the sequence alone).

Two layouts (emu.train.lm_step picks by attention kernel): rows of `max_len` tokens, several
rows per micro-batch, padded to the longest (sdpa / eager, whose dense mask grows with L^2); or
one varlen row per micro-batch holding up to the whole micro-batch's token budget (flex_attention,
which computes only each sequence's own blocks): no padding at all. Either may also cap the
images and frames per micro-batch (`max_visuals`): with the encoder training online, their
count, not the tokens, bounds its activation memory.

Sequences are never cut (an image block `[IMG] <image> x n [/IMG]` always stays whole, and
each sequence's last target is IGNORE, so no target crosses into the next sequence). Hugging Face
LLaMA hands a 4D mask to the attention kernel as it is: sdpa takes this bool mask, eager needs
the additive form (`attention_mask_of`). With either, and the position ids, every packed
sequence gets exactly its hidden states alone, and EmuModel's text and image losses (token
means) equal those of the same sequences unpacked (tests/unit/test_packing.py).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from emu.data.sequence import IGNORE, TokenSequence, VisualSlot


def pack(sequences: list[TokenSequence], max_len: int, max_visuals: int = 0) -> list[list[TokenSequence]]:
    """Rows of whole sequences, each row at most `max_len` tokens and, when `max_visuals` > 0, at
    most that many images and frames (a sequence holding more gets a row of its own): first-fit
    decreasing.

    Sequences are placed longest first (ties in the given order) into the first row with room,
    which fills rows well (at worst 11/9 OPT + 6/9 rows, Dósa 2007). Deterministic: the same input
    gives the same rows. Within a row, sequences keep their input order.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    for s in sequences:
        if len(s) > max_len:
            raise ValueError(f"sequence of sample {s.key!r} is {len(s)} tokens, longer than the row length "
                             f"{max_len}; build sequences with the same max_len as packing")
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))  # stable: ties keep input order
    rows: list[list[int]] = []
    room: list[int] = []
    visual_room: list[int] = []
    for i in order:
        n, v = len(sequences[i]), len(sequences[i].visuals) if max_visuals else 0
        for r, free in enumerate(room):
            if n <= free and v <= visual_room[r]:
                rows[r].append(i)
                room[r] -= n
                visual_room[r] -= v
                break
        else:
            rows.append([i])
            room.append(max_len - n)
            visual_room.append(max_visuals - v)  # negative when alone over the cap: nothing joins it
    return [[sequences[i] for i in sorted(row)] for row in rows]


def micro_batches(rows: list[list[TokenSequence]], max_rows: int, max_visuals: int = 0) -> list[list[list[TokenSequence]]]:
    """Consecutive rows grouped into micro-batches of at most `max_rows` rows and, when
    `max_visuals` > 0, at most that many images and frames (a row over it alone)."""
    groups: list[list[list[TokenSequence]]] = []
    visuals = 0
    for row in rows:
        count = sum(len(s.visuals) for s in row)
        if groups and len(groups[-1]) < max_rows and (not max_visuals or visuals + count <= max_visuals):
            groups[-1].append(row)
            visuals += count
        else:
            groups.append([row])
            visuals = count
    return groups


@dataclass
class Batch:
    """A model batch of R rows of L tokens; visuals in the row-major order of their blocks,
    which is the order EmuModel fills `<image>` / `[gIMG]` positions and reads `*_regress`."""

    input_ids: torch.Tensor         # (R, L) long; padding = pad_id
    targets: torch.Tensor           # (R, L) long; the token h_t must predict, or IGNORE
    position_ids: torch.Tensor      # (R, L) long; 0.. per sequence, 0 on padding
    segments: torch.Tensor          # (R, L) long; sequence number within the row; padding: one each
    image_slots: list[VisualSlot]   # one per `<image>` block
    frame_slots: list[VisualSlot]   # one per `[gIMG]` block (video frames)
    image_regress: torch.Tensor     # (N_img,) bool
    frame_regress: torch.Tensor     # (N_frame,) bool
    real_tokens: int                # tokens of sequences
    padding_tokens: int             # R * L - real_tokens
    keys: list[list[str]]           # sample key of each sequence, per row (for logs and lineage)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(R, 1, L, L) bool, block-diagonal causal, True = attend (module docstring)."""
        return block_causal_mask(self.segments)

    def padding_fraction(self) -> float:
        total = self.real_tokens + self.padding_tokens
        return self.padding_tokens / total if total else 0.0

    def attention_mask_for(self, attn_implementation: str, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """The mask in the form the LM's attention takes (attention_mask_of)."""
        return attention_mask_of(self.segments, attn_implementation, dtype)

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with its tensors on `device`."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device)
        return Batch(**moved)


def block_causal_mask(segments: torch.Tensor) -> torch.Tensor:
    """(R, 1, L, L) bool from (R, L) sequence numbers: True where a position may attend (an
    earlier or the same position of its own sequence), on the segments' device."""
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    return ((segments[:, :, None] == segments[:, None, :]) & causal).unsqueeze(1)


def attention_mask_of(segments: torch.Tensor, attn_implementation: str,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """The mask in the form the LM's attention takes: Hugging Face passes a 4D mask to the
    kernel as it is, and sdpa reads True = attend, while eager *adds* the mask to the scores
    (so it needs 0 / dtype-min; a bool mask there silently lets every token see every other).
    flex_attention takes no mask: given none, transformers finds the packed sequences from
    the position ids (a new sequence wherever they do not step by one: each padding token is
    its own) and builds the block mask itself, computing no masked-out block.
    `attn_implementation` is the LM's; dtype its compute dtype. Built where `segments` is: the
    training step builds it on the device from the (R, L) segments the loader ships."""
    if attn_implementation == "sdpa":
        return block_causal_mask(segments)
    if attn_implementation == "eager":
        allowed = block_causal_mask(segments)
        bias = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
        return bias.masked_fill(~allowed, torch.finfo(dtype).min)
    if attn_implementation == "flex_attention":
        return None
    raise ValueError(f"no packed attention mask for attn_implementation={attn_implementation!r} "
                     "(supported: sdpa, eager, flex_attention)")


def collate(rows: list[list[TokenSequence]], pad_id: int, length: int | None = None) -> Batch:
    """A batch of `rows` (from `pack`), each padded to `length` (default: the longest row)."""
    if not rows or any(not row for row in rows):
        raise ValueError("collate needs at least one row, and no empty row")
    row_lengths = [sum(len(s) for s in row) for row in rows]
    longest = max(row_lengths)
    if length is None:
        length = longest
    elif longest > length:
        raise ValueError(f"a row holds {longest} tokens, more than the batch length {length}")
    n_rows = len(rows)
    input_ids = torch.full((n_rows, length), pad_id, dtype=torch.long)
    targets = torch.full((n_rows, length), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((n_rows, length), dtype=torch.long)
    # Sequence number of each position; padding gets numbers no sequence has (one each), so it
    # attends to itself only.
    owner = torch.arange(length, dtype=torch.long).repeat(n_rows, 1) + length
    for r, row in enumerate(rows):
        start = 0
        for k, s in enumerate(row):
            if len(s.targets) != len(s.ids):
                raise ValueError(f"sequence of sample {s.key!r} has {len(s.ids)} ids but {len(s.targets)} targets")
            end = start + len(s)
            input_ids[r, start:end] = torch.tensor(s.ids, dtype=torch.long)
            targets[r, start:end] = torch.tensor(s.targets, dtype=torch.long)
            position_ids[r, start:end] = torch.arange(len(s), dtype=torch.long)
            owner[r, start:end] = k
            start = end
    visuals = [v for row in rows for s in row for v in s.visuals]
    image_slots = [v for v in visuals if v.kind == "image"]
    frame_slots = [v for v in visuals if v.kind == "frame"]
    real = sum(row_lengths)
    return Batch(
        input_ids=input_ids, targets=targets, position_ids=position_ids, segments=owner,
        image_slots=image_slots, frame_slots=frame_slots,
        image_regress=torch.tensor([v.regress for v in image_slots], dtype=torch.bool),
        frame_regress=torch.tensor([v.regress for v in frame_slots], dtype=torch.bool),
        real_tokens=real, padding_tokens=n_rows * length - real,
        keys=[[s.key for s in row] for row in rows],
    )


def unpacked(sequences: list[TokenSequence], pad_id: int) -> Batch:
    """One sequence per row, padded to the longest: the baseline packing is compared with."""
    return collate([[s] for s in sequences], pad_id)
