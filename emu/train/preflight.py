"""Checks that run before a stage trains, so a wrong setting fails in seconds, not after hours.

The manifests tell how many images and frames each sample has, hence how many positions its
visual tokens take at the stage's pooling (an Emu2-Chat image is 258 positions with its markers).
The check flags exactly the samples the sequence builder (emu.data.sequence, "Too long") would
reject for their visual tokens and fixed markers alone, whatever their text, and nothing else:

    text          never: pretraining text is cut into max_len chunks (Emu2 App. A.1).
    interleaved   one image block does not fit between <s> and </s>: a document is split at
                  segment boundaries and its long texts cut, but an image block is never cut.
    chat, vqa,    the tokens up to the first answer token do not fit: a long chat is truncated
    captions      after its last answer token within max_len (Emu2-Chat, §2.3.1), so only
                  <s> [USER] ":" images-of-the-first-user-turn [ASSISTANT] ":" and that token
                  must fit (each ":" is at least one token). VQA and captions have their one
                  image there; for a chat whose images could not all fit, the images of its
                  first user turn are counted from its record in the shard.
    pairs, video_text, grounded, gen
                  every image or frame, with <s>, </s> (and [VIDEO], <grounding>): these are
                  never cut. For gen every condition image counts, as with entity_drop_p = 0.

With `sequence.too_long=error` that stops the stage before the first step, naming the samples
(dataset/shard:key and the rule), and with `skip` the count is logged. Text length is only known
after tokenising: a sequence whose text makes it too long (a caption, a system message, a first
question) is handled by the same setting when it is built.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from emu.data.datatypes import data_type
from emu.data.schema import IMAGE_PLACEHOLDER, Chat
from emu.data.shards import SampleProblem, decode_sample, iter_raw_samples
from emu.errors import ConfigError
from emu.train.data import discover

log = logging.getLogger(__name__)

#: Kinds written with the Emu2-Chat template and truncated at max_len (emu.data.sequence, chat).
CHAT_KINDS = ("chat", "vqa", "captions")
#: Positions of the chat template up to and including the first answer token, images aside:
#: <s> [USER] ":" [ASSISTANT] ":" and the token itself. Each ":" is tokenized on its own, so it
#: is at least one token; the system message and the question may add more.
CHAT_FIXED = 6


@dataclass(frozen=True)
class Need:
    """The fewest positions a sample's longest uncuttable part takes, and what that part holds."""

    positions: int
    what: str

    def describe(self, kind: str) -> str:
        return f"{kind}: {self.positions} positions for {self.what}"


def need_of(kind: str, n_images: int, n_frames: int, image_tokens: int, frame_tokens: int) -> Need | None:
    """What a sample must fit in one row, as SequenceBuilder builds it; None: it is never too
    long (text). For chat kinds `n_images` are the images before the first answer token."""
    block = image_tokens + 2  # [IMG] + n + [/IMG]
    if kind == "text":
        return None
    if kind == "interleaved":
        return Need(2 + block if n_images else 2, "<s> + one image block + </s>")
    if kind in CHAT_KINDS:
        return Need(CHAT_FIXED + n_images * block,
                    f"<s> [USER]: + {n_images} image(s) + [ASSISTANT]: + the first answer token")
    if n_frames:  # a video: [VIDEO] then [IMG] + m + [/IMG] per frame
        return Need(3 + n_frames * (frame_tokens + 2), f"<s> [VIDEO] + {n_frames} frames + </s>")
    if kind == "grounded":
        return Need(3 + n_images * block, "<s> + the image + <grounding> + </s>")
    return Need(2 + n_images * block, f"<s> + {n_images} image(s) + </s>")


def images_before_first_answer(chat: Chat) -> int:
    """`<image>` placeholders of the user turns before the first assistant turn (the builder
    writes them, in order, before the first answer)."""
    count = 0
    for turn in chat.turns:
        if turn.role == "assistant":
            break
        if turn.role == "user":
            count += turn.content.count(IMAGE_PLACEHOLDER)
    return count


def check_visual_budget(stage: str, data: list[Path], batch_sizes: dict[str, int], max_len: int,
                        image_tokens: int, frame_tokens: int, too_long: str, max_frames: int | None = None) -> int:
    """Raise ConfigError (too_long=error) if any sample of a used data type cannot fit max_len as
    the module docstring says; return how many such samples there are. `max_frames`: frames kept
    per video (stage 1 samples `video_frames` of them)."""
    used = {t for t, n in batch_sizes.items() if n > 0}
    offenders: list[str] = []
    count = 0
    seen: set[Path] = set()
    for refs in discover(data).values():
        for ref in refs:
            if ref.path in seen:  # a dataset holding several types is listed under each
                continue
            seen.add(ref.path)
            for shard in ref.shards:
                rows = pq.read_table(shard.manifest, columns=["key", "kind", "n_images", "n_frames"]).to_pylist()
                found: list[tuple[str, str, Need]] = []
                first_turn: list[str] = []  # chats whose images could not all fit: read their records
                for row in rows:
                    if data_type(row["kind"], bool(row["n_frames"])) not in used:
                        continue
                    frames = row["n_frames"] or 0
                    if max_frames is not None:
                        frames = min(frames, max_frames)
                    need = need_of(row["kind"], row["n_images"] or 0, frames, image_tokens, frame_tokens)
                    if need is None or need.positions <= max_len:
                        continue
                    if row["kind"] == "chat":
                        first_turn.append(row["key"])
                    else:
                        found.append((row["key"], row["kind"], need))
                if first_turn:
                    found += _chats_too_long(shard.path, set(first_turn), max_len, image_tokens)
                for key, kind, need in found:
                    count += 1
                    if len(offenders) < 5:
                        offenders.append(f"{ref.path.name}/{shard.path.name}:{key} ({need.describe(kind)})")
    if count and too_long == "error":
        raise ConfigError(f"{stage}: {count} samples cannot fit {stage}.sequence.max_len={max_len} positions even "
                          f"before their text (images are never cut; chats need only what precedes their first "
                          f"answer), e.g. {', '.join(offenders)}; raise {stage}.sequence.max_len, pool images to "
                          f"fewer tokens, or set {stage}.sequence.too_long=skip")
    if count:
        log.warning("%s: %d samples cannot fit sequence.max_len=%d and will be skipped", stage, count, max_len)
    return count


def _chats_too_long(tar: Path, keys: set[str], max_len: int, image_tokens: int) -> list[tuple[str, str, Need]]:
    """The chats among `keys` whose first-user-turn images alone do not fit, read from the shard.
    A record that cannot be decoded raises here, naming it, as the data loader would."""
    out = []
    for raw in iter_raw_samples(tar):
        if raw.key not in keys:
            continue
        try:
            sample = decode_sample(raw)
        except SampleProblem as exc:
            raise SampleProblem(exc.problem.rule, f"{tar} key {raw.key!r}: {exc.problem.message}") from None
        if not isinstance(sample, Chat):
            continue  # the manifest and the record disagree: the data loader reports it
        need = need_of("chat", images_before_first_answer(sample), 0, image_tokens, 0)
        if need.positions > max_len:
            out.append((raw.key, "chat", need))
    return out


#: Images (or frames) a sample of each data type holds at least (video: `video_frames`, else 8).
_MIN_IMAGES = {"image_text": 1, "grounded": 1, "interleaved": 1, "video_text": None, "video_interleaved": None,
               "edit": 1, "text": 0, "chat": 0}


def step_memory_bytes(config) -> int:
    """A lower bound of the host memory one step's samples take: each sample's token ids
    (int64, sequence.max_len of them, or none for the decoder) and its decoded images as fp32
    (3 x image_size^2 each). Real use is several times this (activations, optimizer)."""
    max_len = getattr(getattr(config, "sequence", None), "max_len", 0)
    pixels = 3 * config.image_size ** 2 * 4
    frames = getattr(config, "video_frames", 8)
    total = 0
    for kind, n in config.batch_sizes.items():
        images = _MIN_IMAGES.get(kind, 0)
        images = frames if images is None else images
        total += int(n) * (max_len * 8 + images * pixels)
    return total


def check_step_memory(stage: str, config, available: int | None = None) -> None:
    """Refuse settings whose step cannot fit this machine's memory even by the lower bound of
    `step_memory_bytes` (a batch size of 1e12 would otherwise grow memory until the process is
    killed), before the stage allocates anything."""
    import psutil

    need = step_memory_bytes(config)
    available = psutil.virtual_memory().total if available is None else available
    if need > available:
        sizes = ", ".join(f"{k}={v}" for k, v in config.batch_sizes.items() if v)
        raise ConfigError(f"{stage}: one step of {stage}.batch_sizes ({sizes}) at {stage}.image_size="
                          f"{config.image_size} needs at least {need / 2**30:,.1f} GiB for its samples alone; this "
                          f"machine has {available / 2**30:,.1f} GiB; lower {stage}.batch_sizes")
