"""Sequence building: one Sample -> the token sequences one training stage reads.

A `SequenceBuilder` turns a sample into `TokenSequence`s: token ids, next-token text targets
(`targets[t]` is the token the hidden state at t must predict, or IGNORE), and the images of the
sequence in order of appearance with a per-image regression flag. This is exactly what
emu.model.emu.EmuModel.forward reads (`text_targets`, visual embeddings in row-major order,
`image_regress` / `frame_regress`); emu.data.packing turns sequences into batches.

Notation below: `<s>`/`</s>` are the tokenizer's BOS/EOS (LLaMA ids 1/2); other markers are the
Emu2 special tokens of emu.data.tokenizer. n = `image_tokens`, m = `frame_tokens`.

    IMAGE = [IMG] <image> x n [/IMG]                   (official Emu2 emu.py; one VisualSlot, kind="image")
    VIDEO = [VIDEO] ([IMG] [gIMG] x m [/IMG]) per frame  (one VisualSlot per frame, kind="frame")

Text and spacing. Every text piece is tokenized on its own (no special tokens added, special-token
strings inside it are plain text: a caption containing "<image>" or "</s>" cannot forge a marker),
so BPE never merges across a marker or an image. Whitespace belongs to the word after it, as both
byte-level BPE and SentencePiece pre-tokenize: a text piece is written " " + text.strip() (one
leading space, none trailing), no whitespace token is ever encoded before a marker, and
punctuation that continues the previous text (a grounded caption's "." after a phrase) gets no
space. So a word has one token form wherever it stands (first, after an image, after a marker),
and for a byte-level BPE tokenizer the ids equal `tokenizer(decoded_text)` of the whole sequence
(when no text holds a special-token string): a prompt built as a string at inference matches.
Texts are otherwise kept verbatim (inner newlines included); blank pieces are left out.
SentencePiece tokenizers (LLaMA, Llama-2, Mistral; legacy or not) add a "dummy prefix" "▁" to
every text they encode, so a piece encoded alone would start a new word: ":" after `[USER]`
would become "▁" ":" and, with the legacy tokenizer.json normaliser, " caption" "▁" "▁caption",
stray "▁" tokens between text and image spans. For such tokenizers (detected once, by encoding a
few probes alone and after an anchor) every piece is encoded after a newline anchor whose ids are
then dropped: the piece's ids are those it has inside a longer text (" caption" -> "▁caption",
":" -> ":"), the same non-legacy tokenization LLaMA gives a whole prompt.

Formats (`|` separates the parts; T* marks a supervised text target; R marks a regressed image):

caption (stage 1, Emu2 §2.2.2: image-text and video-text pairs, captioning loss only)
    pair:  <s> | IMAGE or VIDEO | " caption"T* | </s>T*
    The visual always comes first. Text targets: the caption tokens and `</s>`. No regression.
    Any other kind raises ValueError.

pretrain (stage 2, Emu2 §2.2.2, App. B.1): every text token is a target (markers `[IMG]`,
`[/IMG]`, `[VIDEO]`, `<grounding>`, `<phrase>`, coordinates ... and `</s>`: the model must learn to
open and close images and to ground), never `<s>` (nothing precedes it) nor a visual placeholder;
every image and frame is regressed (R).
    pair:        <s> | IMAGE/VIDEO R | " caption" | </s>    with P = image_text_order_p
                 <s> | " caption" | IMAGE/VIDEO R | </s>    otherwise (one rng.random() per pair)
    interleaved: <s> | segments in document order, each image before or after its text:
                 " text" or IMAGE R | </s>
                 An image's text is the text segment that follows it (after any other images): the
                 sentence it was matched to, since the mmc4 importer writes each image right before
                 its matched sentence (emu.data.formats.mmc4, as OpenFlamingo does); images matched
                 to one sentence share it. Each such image stays before its text with
                 P = image_text_order_p, else moves right after it (App. A.1: each image before or
                 after its text, p = 0.5; one rng.random() per image, in document order); images on
                 one side of a text keep their order. Images after the last text have no text of
                 their own and stay last (no draw). So P = 1 keeps the document order (the
                 evaluation harness builds its base prompts that way).
                 A document longer than max_len is split greedily, in order, into several sequences
                 (each with its own <s> and </s>) at segment boundaries, except that a text segment
                 longer than a whole sequence is cut into token pieces, the first filling the current
                 sequence; an image block is never cut. Chunks keep the sample key; slots keep their
                 index into sample.images.
    video_text:  <s> | [VIDEO] | per frame i: " subtitle_i" (left out when blank) and
                 [IMG] [gIMG] x m [/IMG] R, the frame first with P = image_text_order_p, else after
                 the subtitle, which is its time order (subtitle_i is spoken before frame i; App. A.1;
                 one rng.random() per frame, blank subtitle or not) | " trailing_text" (when not
                 blank) | </s>
    grounded:    <s> | IMAGE R | <grounding> | caption with every phrase replaced by
                 <phrase> phrase</phrase><object>BOXES</object>   with P = phrase_first_p,
                 <object>BOXES</object><phrase> phrase</phrase>   otherwise (one rng.random() per phrase)
                 | </s>
                 BOXES = <patch_index_x0><patch_index_y0><patch_index_x1><patch_index_y1> per box,
                 joined by </delimiter_of_multi_objects/>; a coordinate c in [0, 1] becomes
                 <patch_index_q>, q = round-half-up(c * 256) in 0..256 (official lm.py: 257 bins,
                 quantized_size 256). Out-of-range coordinates, empty or overlapping phrases raise.
                 Referring expressions are not written (they serve REC tasks, not captions).
    text:        <s> | " text" | </s>, cut into chunks of at most max_len tokens (App. A.1: Pile text
                 in 2,048-token chunks): each chunk starts with its own <s>, only the last ends with
                 </s>, and every token after <s> is a target. A last chunk is never </s> alone (it
                 takes the last text token too, so no sequence teaches "<s></s>"). Chunks keep the
                 sample key. Text is never too long.

chat (Emu2-Chat instruction tuning, §2.3.1: "<Sys.Msg.> [USER]: <Instruction> [ASSISTANT]: <Answer>",
"only tokens in the <Answer> section will be supervised")
    <s> | " system" | per exchange: [USER] | ":" | user content | [ASSISTANT] | ":" | " answer"T* | </s>T*
    e.g. "<s> You are a helpful assistant.[USER]:[IMG]<image>..[/IMG] What color?[ASSISTANT]: red</s>[USER]: ..."
    User content is split at its `<image>` placeholders, each replaced by the next IMAGE block (n
    tokens: 256 for Emu2-Chat's 16x16 pooling); its text pieces are stripped and written " piece".
    Text targets: each answer's tokens and the `</s>` after it, nothing else. No regression.
    Longer than max_len: truncated (Emu2-Chat truncates at 2,048 tokens, §2.3.1) right after the
    last answer token (or answer `</s>`) within the first max_len tokens. What follows it trains
    nothing (causal attention: no target before it can see it), and since answer tokens are never
    inside an image block, the cut never falls inside one: a block the max_len cut would split is
    left out whole, with everything after it. The visual slots are those of the blocks kept. A chat
    whose first answer token lies beyond max_len would train nothing and is handled by `too_long`.
    Truncated samples are counted in `builder.truncated[data_type]`.
    System message: the sample's own leading system turn if it has one (an empty one means none),
    else system_messages[category]: vqa and captions are "academic", chat samples use their
    `category`, or "chat" when it is empty; a category missing from system_messages raises.
      chat:      optional system turn first, then user/assistant turns alternating, starting with
                 user and ending with assistant; `<image>` only in user turns, one per image.
      vqa:       user "<image> {question}", answer multiple_choice_answer, or else the most common
                 of `answers` (ties: the first given).
      captions:  user "<image> Describe the image in one sentence.", answer captions[0].

gen (Emu2-Gen, §2.3.2: "the regression loss only applies to the visual embeddings of the last image")
    <s> | condition segments: " text" or IMAGE (not regressed) | IMAGE R (the target) | </s>
    No text targets. gen samples: `condition`, target = images[target]; image pairs: condition =
    the caption, target = the image. Entity dropping ("we randomly drop tokens of entities and
    object localization image"): each condition segment is dropped with probability
    entity_drop_p (one rng.random() per segment); if that drops them all, one of them, chosen
    with rng.randrange, is kept, so a non-empty condition never becomes empty.

Too long: pretrain text is chunked, interleaved documents are split and chat samples truncated
(above). What still cannot fit max_len (a caption pair, a pretrain pair, video_text, grounded or
gen sequence longer than max_len, an interleaved image block that alone does not fit between <s>
and </s>, a chat with no answer token within max_len) is handled by `too_long`: "error" raises
ValueError naming the sample key, the length and max_len; "skip" returns [] and counts the sample
in `builder.skipped["too_long"]`. Those formats are not cut because a cut would drop the
caption, the target image or the frames that make the sample.

Malformed samples (wrong kind for the mode, missing images, broken turn order, bad phrases)
raise ValueError naming the sample key: the builder never silently repairs data.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from emu.data import datatypes
from emu.data.schema import (
    IMAGE_PLACEHOLDER,
    VQA,
    Captions,
    Chat,
    Gen,
    Grounded,
    Interleaved,
    Pair,
    Phrase,
    Sample,
    Segment,
    TextOnly,
    VideoText,
)
from emu.data.tokenizer import (
    ASSISTANT,
    DELIMITER_OF_MULTI_OBJECTS,
    GIMG,
    GROUNDING,
    IMAGE,
    IMG,
    IMG_END,
    OBJECT,
    OBJECT_END,
    PATCH_INDEX,
    PHRASE,
    PHRASE_END,
    USER,
    VIDEO,
)
from emu.errors import ConfigError

#: A text target that is not supervised: the Hugging Face convention, the same value as
#: emu.model.emu.IGNORE (not imported from there, so building sequences needs no model code).
IGNORE = -100
MODES = ("caption", "pretrain", "chat", "gen")
TOO_LONG_POLICIES = ("error", "skip")
#: Emu2 App. C.1 system messages, keyed by data category (InstructConfig.system_messages has the same).
DEFAULT_SYSTEM_MESSAGES: dict[str, str] = {
    "academic": "You are a helpful assistant, dedicated to provide concise and efficient answers.",
    "chat": "You are a helpful assistant, dedicated to delivering comprehensive and meticulous responses.",
}
#: The instruction of COCO-style caption samples in chat mode.
CAPTION_INSTRUCTION = "Describe the image in one sentence."
#: Coordinates are quantised to 0..QUANTIZED_SIZE (official Emu2 lm.py, Kosmos-2 style).
QUANTIZED_SIZE = len(PATCH_INDEX) - 1


@dataclass(frozen=True)
class VisualSlot:
    """One image (or video frame) of a sequence, in order of appearance."""

    key: str                          # sample key; precomputed embeddings are keyed by (key, index)
    index: int                        # index into sample.images
    data: bytes = field(repr=False)   # the encoded image, as the shard stores it
    kind: Literal["image", "frame"]   # an `<image>` block, or a `[gIMG]` block of a video
    regress: bool                     # whether this image's embeddings are regression targets


@dataclass
class TokenSequence:
    """One training sequence. `targets[t]` = ids[t + 1] when position t + 1 is a supervised text
    token, else IGNORE; the last target is always IGNORE (so packed neighbours never leak)."""

    key: str
    data_type: str          # emu.data.datatypes name (the unit of per-type batch sizes)
    ids: list[int]
    targets: list[int]
    visuals: list[VisualSlot]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def text_targets(self) -> int:
        return sum(t != IGNORE for t in self.targets)


@dataclass
class SequenceRules:
    """How one stage writes samples as sequences (the module docstring gives each format)."""

    #: caption: stage-1 pairs, caption loss only; pretrain: stage-2 mixture, all text + all
    #: images; chat: Emu2-Chat template, answers only; gen: Emu2-Gen, last image only.
    mode: Literal["caption", "pretrain", "chat", "gen"]
    #: `<image>` tokens per image: 64 for Emu2's 8x8 pooling, 256 for Emu2-Chat's 16x16 (§2.3.1).
    image_tokens: int
    #: `[gIMG]` tokens per video frame (Emu2 keeps 64, official chat.py v_query=64).
    frame_tokens: int
    #: Longest sequence in tokens (Emu2: 2,048 = LLaMA's context; MMC4 subsequences L = 1,024).
    max_len: int
    #: pretrain: probability that an image/video comes before its text (App. A.1, B.1: 0.5): a
    #: pair's caption, an interleaved image's sentence, a video frame's subtitle (one draw per
    #: image). Caption mode (stage 1) always puts the visual first.
    image_text_order_p: float = 0.5
    #: pretrain, grounded: probability that a phrase comes before its coordinates (App. B.1: 0.7).
    phrase_first_p: float = 0.7
    #: chat: system message per data category (InstructConfig.system_messages; App. C.1). A
    #: sample's own system turn wins.
    system_messages: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_SYSTEM_MESSAGES))
    #: gen: probability of dropping each condition segment (entity text or image); never all of
    #: them. The paper gives no value (InstructConfig.entity_drop_p).
    entity_drop_p: float = 0.0
    #: A sequence longer than max_len that is not chunked or truncated (module docstring, "Too
    #: long"): "error" raises ValueError, "skip" drops the sample and counts it in
    #: SequenceBuilder.skipped.
    too_long: Literal["error", "skip"] = "error"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"sequence.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("image_tokens", "frame_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"sequence.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.max_len, int) or self.max_len < 3:
            raise ConfigError(f"sequence.max_len must be an integer >= 3 (<s>, one token, </s>), got {self.max_len!r}")
        for name in ("image_text_order_p", "phrase_first_p", "entity_drop_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"sequence.{name} must be a probability in [0, 1], got {value!r}")
        if self.too_long not in TOO_LONG_POLICIES:
            raise ConfigError(f"sequence.too_long must be one of {', '.join(TOO_LONG_POLICIES)}, got {self.too_long!r}")


# ---- token runs before tokenisation ----------------------------------------------------------

@dataclass
class _Run:
    """Tokens of part of a sequence, with per-token supervision and the visual slots inside."""

    ids: list[int] = field(default_factory=list)
    supervised: list[bool] = field(default_factory=list)
    visuals: list[VisualSlot] = field(default_factory=list)

    def extend(self, other: _Run) -> None:
        self.ids += other.ids
        self.supervised += other.supervised
        self.visuals += other.visuals

    def piece(self, start: int, end: int) -> _Run:
        """Tokens start..end of a text run (one holding no image: a slice could split a block)."""
        return _Run(self.ids[start:end], self.supervised[start:end])


class _Draft:
    """Parts of a run in order: texts (tokenized later, all of a sample in one call) and tokens."""

    def __init__(self) -> None:
        self.parts: list[tuple[str, bool] | _Run] = []

    def text(self, text: str, supervised: bool) -> None:
        if text:
            self.parts.append((text, supervised))

    def tokens(self, ids: list[int], supervised: bool | list[bool], visuals: list[VisualSlot] = ()) -> None:
        flags = supervised if isinstance(supervised, list) else [supervised] * len(ids)
        self.parts.append(_Run(list(ids), flags, list(visuals)))


def _word(text: str) -> str:
    """A text piece as written: one leading space (whitespace belongs to the next word), or ''."""
    text = text.strip()
    return " " + text if text else ""


#: Put before each text piece for tokenizers that mark the start of every text (module docstring):
#: a newline is LLaMA's byte token <0x0A>, which no piece of their vocabularies merges with.
_ANCHOR = "\n"
_PROBES = ("a", " a", ":", "a.")


def _encode_texts(tokenizer, texts: list[str], anchor: list[int] | None) -> list[list[int]]:
    """Each text's ids as a continuation of text (module docstring, "Text and spacing"): encoded
    as is, or, with `anchor` (the anchor's ids), after the anchor whose ids are then dropped. A
    text that merges with the anchor (no vocabulary of the LLaMA family does) is encoded as is."""
    def encode(batch: list[str]) -> list[list[int]]:
        return tokenizer(batch, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    if anchor is None:
        return encode(texts)
    n = len(anchor)
    out = [list(ids[n:]) if list(ids[:n]) == anchor else None for ids in encode([_ANCHOR + t for t in texts])]
    stray = [i for i, ids in enumerate(out) if ids is None]
    for i, ids in zip(stray, encode([texts[i] for i in stray]) if stray else []):
        out[i] = list(ids)
    return out


def _prefix_anchor(tokenizer) -> list[int] | None:
    """The anchor's ids when the tokenizer encodes a text alone differently from the same text
    inside a longer one (SentencePiece's dummy prefix), else None (byte-level BPE: Llama-3, Qwen2,
    GPT-2 and our own tokenizer encode pieces as they are)."""
    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    anchor = encode(_ANCHOR)
    for probe in _PROBES:
        after = encode(_ANCHOR + probe)
        if after[:len(anchor)] == anchor and after[len(anchor):] != encode(probe):
            return anchor
    return None


def _quantise(value: float, key: str) -> int:
    q = math.floor(value * QUANTIZED_SIZE + 0.5)  # round half up
    if not 0 <= q <= QUANTIZED_SIZE:
        raise ValueError(f"sample {key!r}: box coordinate {value} is outside [0, 1] (normalised coordinates)")
    return q


class SequenceBuilder:
    """Builds the sequences of one stage (rules.mode) from samples; see the module docstring."""

    def __init__(self, tokenizer, rules: SequenceRules):
        self.tokenizer = tokenizer
        self.rules = rules
        #: Samples left out, by reason ("too_long" when rules.too_long == "skip").
        self.skipped: Counter[str] = Counter()
        #: Chat-mode samples truncated at max_len, by data type (what the trainer logs).
        self.truncated: Counter[str] = Counter()
        names = (IMG, IMG_END, IMAGE, GIMG, VIDEO, GROUNDING, PHRASE, PHRASE_END, OBJECT, OBJECT_END,
                 DELIMITER_OF_MULTI_OBJECTS, USER, ASSISTANT, *PATCH_INDEX)
        ids = {name: tokenizer.convert_tokens_to_ids(name) for name in names}
        missing = [name for name, i in ids.items() if i is None or i == tokenizer.unk_token_id]
        if missing:
            raise ConfigError(f"tokenizer lacks the special tokens {missing[:8]}{' ...' if len(missing) > 8 else ''}; "
                              "build it with emu.data.tokenizer.add_special_tokens")
        if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
            raise ConfigError("tokenizer needs BOS and EOS tokens (<s>, </s>) to delimit sequences")
        self._id = ids
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self._anchor = _prefix_anchor(tokenizer)

    @staticmethod
    def data_type_of(sample: Sample) -> str:
        return datatypes.data_type_of(sample)

    # ---- entry point -----------------------------------------------------------------------

    def build(self, sample: Sample, rng: random.Random) -> list[TokenSequence]:
        """The sequences of `sample` for this stage: usually one; several for a long text or
        interleaved document in pretrain mode; none when the sample is too long and
        too_long == "skip"."""
        return self.build_all([(sample, rng)])[0]

    def build_all(self, samples: list[tuple[Sample, random.Random]]) -> list[list[TokenSequence]]:
        """`build` of each (sample, its rng), the one-draft samples' texts tokenized in a single
        call: a step's worth of per-call tokenizer overhead was a sixth of a data loader's work."""
        drafts = [self._draft(sample, rng) for sample, rng in samples]
        pending = [d for d in drafts if isinstance(d, _Draft)]
        runs = iter(self._encode(pending))
        return [self._finish(sample, next(runs)) if isinstance(draft, _Draft) else draft
                for (sample, _), draft in zip(samples, drafts)]

    def _draft(self, sample: Sample, rng: random.Random) -> _Draft | list[TokenSequence]:
        """The sample's draft, or its sequences where it makes several (interleaved, long text)."""
        mode = self.rules.mode
        allowed = {
            "caption": (Pair,),
            "pretrain": (Pair, Interleaved, VideoText, Grounded, TextOnly),
            "chat": (Chat, VQA, Captions),
            "gen": (Gen, Pair),
        }[mode]
        if not isinstance(sample, allowed):
            raise ValueError(f"sample {sample.key!r} is a {sample.kind!r} sample, which {mode!r} sequences "
                             f"cannot hold (they take {', '.join(c.kind for c in allowed)})")
        if mode == "pretrain" and isinstance(sample, Interleaved):
            return self._interleaved(sample, rng)
        if mode == "pretrain" and isinstance(sample, TextOnly):
            return self._text(sample)
        if mode == "caption":
            return self._caption(sample)
        if mode == "pretrain":
            return self._pretrain(sample, rng)
        if mode == "chat":
            return self._chat(sample)
        return self._gen(sample, rng)

    def _finish(self, sample: Sample, run: _Run) -> list[TokenSequence]:
        """The sequence of a one-draft sample, from its tokenized run (too long: truncated or skipped)."""
        if len(run.ids) > self.rules.max_len:
            if self.rules.mode == "chat":
                return self._truncate(sample, run)
            return self._too_long(sample, f"is {len(run.ids)} tokens long")
        return [self._sequence(sample, run)]

    # ---- formats -----------------------------------------------------------------------------

    def _caption(self, sample: Pair) -> _Draft:
        draft = self._start()
        self._pair_visual(draft, sample, supervised=False, regress=False)
        draft.text(_word(sample.text), True)
        draft.tokens([self.eos], True)
        return draft

    def _pretrain(self, sample: Sample, rng: random.Random) -> _Draft:
        draft = self._start()
        if isinstance(sample, Pair):
            if rng.random() < self.rules.image_text_order_p:
                self._pair_visual(draft, sample, supervised=True, regress=True)
                draft.text(_word(sample.text), True)
            else:
                draft.text(_word(sample.text), True)
                self._pair_visual(draft, sample, supervised=True, regress=True)
        elif isinstance(sample, VideoText):
            if len(sample.subtitles) != len(sample.images):
                raise ValueError(f"sample {sample.key!r}: {len(sample.subtitles)} subtitles for "
                                 f"{len(sample.images)} frames (one subtitle, possibly empty, per frame)")
            draft.tokens([self._id[VIDEO]], True)
            for index, subtitle in enumerate(sample.subtitles):
                # App. A.1: each frame before or after its subtitle (the text spoken before it).
                frame_first = rng.random() < self.rules.image_text_order_p
                if not frame_first:
                    draft.text(_word(subtitle), True)
                self._block(draft, sample, index, "frame", supervised=True, regress=True)
                if frame_first:
                    draft.text(_word(subtitle), True)
            draft.text(_word(sample.trailing_text), True)
        else:  # Grounded
            self._check_images(sample, 1)
            self._block(draft, sample, 0, "image", supervised=True, regress=True)
            draft.tokens([self._id[GROUNDING]], True)
            self._grounded_caption(draft, sample, rng)
        draft.tokens([self.eos], True)
        return draft

    def _text(self, sample: TextOnly) -> list[TokenSequence]:
        """Pretraining text cut into chunks of at most max_len tokens, each with its own <s>
        (App. A.1: Pile text in 2,048-token chunks); the last ends with </s>."""
        draft = _Draft()
        draft.text(_word(sample.text), True)
        draft.tokens([self.eos], True)
        stream = self._encode([draft])[0]
        step = self.rules.max_len - 1  # <s> takes one position of every chunk
        starts = list(range(0, len(stream.ids), step))
        if len(starts) > 1 and len(stream.ids) - starts[-1] == 1:
            starts[-1] -= 1  # a last chunk of </s> alone would teach "<s></s>": it takes a text token too
        sequences = []
        for start, end in zip(starts, [*starts[1:], len(stream.ids)]):
            run = _Run([self.bos], [False])
            run.extend(stream.piece(start, end))
            sequences.append(self._sequence(sample, run))
        return sequences

    def _ordered(self, segments: list[Segment], rng: random.Random) -> list[Segment]:
        """The segments with each image before or after its text (App. A.1; the module docstring
        says which text is an image's): the images waiting for a text go before it with
        P = image_text_order_p, else right after it, one rng.random() each."""
        ordered: list[Segment] = []
        waiting: list[Segment] = []
        for segment in segments:
            if segment.text is None:
                waiting.append(segment)
                continue
            first = [rng.random() < self.rules.image_text_order_p for _ in waiting]
            ordered += [image for image, f in zip(waiting, first) if f]
            ordered.append(segment)
            ordered += [image for image, f in zip(waiting, first) if not f]
            waiting = []
        return ordered + waiting  # images after the last text have no text of their own

    def _interleaved(self, sample: Interleaved, rng: random.Random) -> list[TokenSequence]:
        """One sequence per greedy run of segments that fits max_len with <s> and </s>; a text
        segment longer than a whole sequence is cut into token pieces."""
        drafts = []
        for segment in self._ordered(sample.segments, rng):
            draft = _Draft()
            if segment.text is not None:
                draft.text(_word(segment.text), True)
            else:
                self._block(draft, sample, segment.image, "image", supervised=True, regress=True)
            drafts.append(draft)
        units = [u for u in self._encode(drafts) if u.ids]
        room = self.rules.max_len - 2  # <s> and </s>
        chunks: list[list[_Run]] = [[]]
        used = 0
        for unit in units:
            if len(unit.ids) > room and not unit.visuals:
                # Text that cannot fit any sequence whole is cut like pretraining text (App. A.1),
                # its first piece filling the current sequence; a shorter segment stays whole.
                cuts = [0, *range(room - used or room, len(unit.ids), room)]
                pieces = [unit.piece(a, b) for a, b in zip(cuts, [*cuts[1:], len(unit.ids)])]
            else:
                pieces = [unit]
            for piece in pieces:
                if len(piece.ids) > room:
                    return self._too_long(sample, f"has an image block that alone makes a sequence of "
                                                  f"{len(piece.ids) + 2} tokens")
                if used + len(piece.ids) > room:
                    chunks.append([])
                    used = 0
                chunks[-1].append(piece)
                used += len(piece.ids)
        sequences = []
        for chunk in chunks:
            run = _Run([self.bos], [False])
            for unit in chunk:
                run.extend(unit)
            run.extend(_Run([self.eos], [True]))
            sequences.append(self._sequence(sample, run))
        return sequences

    def _grounded_caption(self, draft: _Draft, sample: Grounded, rng: random.Random) -> None:
        """The caption with each phrase wrapped in <phrase> tags next to its <object> boxes.

        Whitespace before a boundary moves after it (" a red circle" inside the tags, as
        Kosmos-2 writes it); text that continues without a space (".") stays attached."""
        text = sample.text
        phrases = sorted(sample.phrases, key=lambda p: p.start)
        end = 0
        for phrase in phrases:
            if not (end <= phrase.start < phrase.end <= len(text)) or not text[phrase.start:phrase.end].strip():
                raise ValueError(f"sample {sample.key!r}: phrase [{phrase.start}, {phrase.end}) is empty, out of the "
                                 f"caption (length {len(text)}) or overlaps the previous phrase")
            if not phrase.boxes:
                raise ValueError(f"sample {sample.key!r}: phrase {text[phrase.start:phrase.end]!r} has no box")
            end = phrase.end
        pieces: list[tuple[str, Phrase | None]] = []
        cursor = 0
        for phrase in phrases:
            pieces.append((text[cursor:phrase.start], None))
            pieces.append((text[phrase.start:phrase.end], phrase))
            cursor = phrase.end
        pieces.append((text[cursor:], None))
        carry = True  # whitespace pending before the next word; the caption starts a word after <grounding>
        for piece, phrase in pieces:
            core = piece.strip()
            if not core:  # blank text between two phrases (or at an end) only passes its space on
                carry = carry or bool(piece)
                continue
            written = (" " if carry or piece[0].isspace() else "") + core
            carry = piece[-1].isspace()
            if phrase is None:
                draft.text(written, True)
                continue
            if rng.random() < self.rules.phrase_first_p:
                self._phrase(draft, written)
                self._objects(draft, sample.key, phrase)
            else:
                self._objects(draft, sample.key, phrase)
                self._phrase(draft, written)

    def _phrase(self, draft: _Draft, written: str) -> None:
        draft.tokens([self._id[PHRASE]], True)
        draft.text(written, True)
        draft.tokens([self._id[PHRASE_END]], True)

    def _objects(self, draft: _Draft, key: str, phrase: Phrase) -> None:
        ids = [self._id[OBJECT]]
        for i, box in enumerate(phrase.boxes):
            if i:
                ids.append(self._id[DELIMITER_OF_MULTI_OBJECTS])
            ids += [self._id[PATCH_INDEX[_quantise(c, key)]] for c in box.as_list()]
        ids.append(self._id[OBJECT_END])
        draft.tokens(ids, True)

    def _chat(self, sample: Chat | VQA | Captions) -> _Draft:
        # An exchange is (user content, answer); user content is a list of text pieces and
        # None for each image, in order.
        if isinstance(sample, Chat):
            system, exchanges = self._exchanges(sample)
            if system is None:
                system = self._system_message(sample.category or "chat", sample.key)
        else:
            system = self._system_message("academic", sample.key)
            if isinstance(sample, VQA):
                answer = sample.multiple_choice_answer or (
                    Counter(sample.answers).most_common(1)[0][0] if sample.answers else "")
                exchanges = [([None, sample.question], answer)]
            else:
                exchanges = [([None, CAPTION_INSTRUCTION], sample.captions[0] if sample.captions else "")]
            if not exchanges[0][1].strip():
                raise ValueError(f"sample {sample.key!r} ({sample.kind}) has no answer to supervise")
        placeholders = sum(piece is None for user, _ in exchanges for piece in user)
        if placeholders != len(sample.images):
            raise ValueError(f"sample {sample.key!r} has {placeholders} {IMAGE_PLACEHOLDER} placeholders in its "
                             f"user turns but {len(sample.images)} images")
        draft = self._start()
        draft.text(_word(system), False)
        image = 0
        for user, answer in exchanges:
            draft.tokens([self._id[USER]], False)
            draft.text(":", False)
            for piece in user:
                if piece is None:
                    self._block(draft, sample, image, "image", supervised=False, regress=False)
                    image += 1
                else:
                    draft.text(_word(piece), False)
            draft.tokens([self._id[ASSISTANT]], False)
            draft.text(":", False)
            draft.text(_word(answer), True)
            draft.tokens([self.eos], True)
        return draft

    def _exchanges(self, sample: Chat) -> tuple[str | None, list[tuple[list[str | None], str]]]:
        turns = list(sample.turns)
        system = None
        if turns and turns[0].role == "system":
            system = turns.pop(0).content
        roles = [t.role for t in turns]
        expected = ["user", "assistant"] * (len(turns) // 2)
        if not turns or roles != expected:
            raise ValueError(f"sample {sample.key!r}: chat turns must be an optional system turn, then user and "
                             f"assistant turns alternating, starting with user and ending with assistant; "
                             f"got {roles if system is None else ['system', *roles]}")
        for turn in turns[1::2]:
            if IMAGE_PLACEHOLDER in turn.content:
                raise ValueError(f"sample {sample.key!r}: an assistant turn holds {IMAGE_PLACEHOLDER}; answers are "
                                 "text in chat mode (image answers are gen samples)")
        exchanges = []
        for user, assistant in zip(turns[0::2], turns[1::2]):
            pieces: list[str | None] = []
            for position, piece in enumerate(user.content.split(IMAGE_PLACEHOLDER)):
                if position:
                    pieces.append(None)
                pieces.append(piece)
            exchanges.append((pieces, assistant.content))
        return system, exchanges

    def _system_message(self, category: str, key: str) -> str:
        try:
            return self.rules.system_messages[category]
        except KeyError:
            raise ValueError(f"sample {key!r} has category {category!r}, which system_messages does not name "
                             f"(it has {sorted(self.rules.system_messages)})") from None

    def _gen(self, sample: Gen | Pair, rng: random.Random) -> _Draft:
        if isinstance(sample, Pair):
            if sample.media != "image":
                raise ValueError(f"sample {sample.key!r} is a video pair; gen sequences generate one image")
            self._check_images(sample, 1)
            condition, target = [Segment(text=sample.text)], 0
        else:
            condition, target = sample.condition, sample.target
            if not 0 <= target < len(sample.images):
                raise ValueError(f"sample {sample.key!r}: target image {target} is not among its "
                                 f"{len(sample.images)} images")
            if any(s.image == target for s in condition):
                raise ValueError(f"sample {sample.key!r}: the target image {target} is also a condition")
        kept = [s for s in condition if not rng.random() < self.rules.entity_drop_p]
        if condition and not kept:  # never drop every condition: keep one at random
            kept = [condition[rng.randrange(len(condition))]]
        draft = self._start()
        for segment in kept:
            if segment.text is not None:
                draft.text(_word(segment.text), False)
            else:
                self._block(draft, sample, segment.image, "image", supervised=False, regress=False)
        self._block(draft, sample, target, "image", supervised=False, regress=True)
        draft.tokens([self.eos], False)
        return draft

    # ---- pieces --------------------------------------------------------------------------------

    def _start(self) -> _Draft:
        draft = _Draft()
        draft.tokens([self.bos], False)
        return draft

    def _pair_visual(self, draft: _Draft, sample: Pair, supervised: bool, regress: bool) -> None:
        if sample.media == "video":
            if not sample.images:
                raise ValueError(f"sample {sample.key!r} is a video pair without frames")
            draft.tokens([self._id[VIDEO]], supervised)
            for index in range(len(sample.images)):
                self._block(draft, sample, index, "frame", supervised, regress)
        else:
            self._check_images(sample, 1)
            self._block(draft, sample, 0, "image", supervised, regress)

    def _block(self, draft: _Draft, sample: Sample, index: int, kind: Literal["image", "frame"],
               supervised: bool, regress: bool) -> None:
        """[IMG] + n placeholders + [/IMG]; the markers are text tokens (supervised as given), the
        placeholders never are (their positions carry visual embeddings)."""
        if not 0 <= index < len(sample.images):
            raise ValueError(f"sample {sample.key!r} refers to image {index} but has {len(sample.images)} images")
        n, placeholder = ((self.rules.image_tokens, self._id[IMAGE]) if kind == "image"
                          else (self.rules.frame_tokens, self._id[GIMG]))
        slot = VisualSlot(key=sample.key, index=index, data=sample.images[index], kind=kind, regress=regress)
        draft.tokens([self._id[IMG], *[placeholder] * n, self._id[IMG_END]],
                     [supervised, *[False] * n, supervised], [slot])

    @staticmethod
    def _check_images(sample: Sample, count: int) -> None:
        if len(sample.images) != count:
            raise ValueError(f"sample {sample.key!r} ({sample.kind}) must have {count} image(s), "
                             f"has {len(sample.images)}")

    def _encode(self, drafts: list[_Draft]) -> list[_Run]:
        """Tokenize every text of the drafts in one tokenizer call, each text on its own."""
        texts = [part[0] for draft in drafts for part in draft.parts if isinstance(part, tuple)]
        encoded = iter(_encode_texts(self.tokenizer, texts, self._anchor) if texts else [])
        runs = []
        for draft in drafts:
            run = _Run()
            for part in draft.parts:
                if isinstance(part, tuple):
                    ids = list(next(encoded))
                    run.extend(_Run(ids, [part[1]] * len(ids)))
                else:
                    run.extend(part)
            runs.append(run)
        return runs

    def _sequence(self, sample: Sample, run: _Run) -> TokenSequence:
        ids = run.ids
        targets = [ids[t + 1] if run.supervised[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
        return TokenSequence(key=sample.key, data_type=self.data_type_of(sample), ids=ids, targets=targets,
                             visuals=run.visuals)

    def _truncate(self, sample: Chat | VQA | Captions, run: _Run) -> list[TokenSequence]:
        """The chat sequence up to its last supervised token within max_len (Emu2-Chat truncates at
        2,048 tokens, §2.3.1). Later tokens train nothing, and no supervised token lies inside an
        image block, so no block is cut: those after the cut are left out with their slots."""
        within = [t for t in range(self.rules.max_len) if run.supervised[t]]
        if not within:
            first = run.supervised.index(True)
            return self._too_long(sample, f"keeps no answer token when truncated: its first answer token is "
                                          f"token {first + 1}")
        end = within[-1] + 1
        blocks = run.ids[:end].count(self._id[IMG])  # chat text cannot forge [IMG]: one per kept slot
        self.truncated[self.data_type_of(sample)] += 1
        return [self._sequence(sample, _Run(run.ids[:end], run.supervised[:end], run.visuals[:blocks]))]

    def _too_long(self, sample: Sample, what: str) -> list[TokenSequence]:
        if self.rules.too_long == "skip":
            self.skipped["too_long"] += 1
            return []
        raise ValueError(f"sample {sample.key!r} ({self.data_type_of(sample)}) {what}, more than "
                         f"max_len={self.rules.max_len} (set too_long='skip' to leave such samples out, "
                         "or raise max_len)")
