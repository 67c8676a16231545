"""Tokenizer and special tokens, with the official Emu2 strings and order.

Emu2 adds 272 tokens after LLaMA's 32,000 (ids 32000..32271, official `lm.py`): `[PAD]`, the image
and video markers, the grounding tokens of its released code (Kosmos-2 style phrase/object tags
and 257 coordinate tokens `<patch_index_0000>`..`<patch_index_0256>`), and `<REC>`; Emu2-Chat adds
`[USER]` and `[ASSISTANT]`. We always add all of them in that order, so a model's embedding rows
line up with the released checkpoints (emu.model.official pads the two chat rows for the base).

An image in a sequence is `[IMG]` + n x `<image>` + `[/IMG]` (n = 64 for 8x8 pooling, 256 for
16x16); a video is `[VIDEO]` then, per frame, `[IMG]` + n x `[gIMG]` + `[/IMG]` (official
`emu.py`: "temporarily borrow [gIMG] as the video frame feature placeholder").
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from emu.errors import ConfigError

PAD = "[PAD]"
IMG = "[IMG]"              # begin of an image: the hidden state here predicts the first visual embedding
IMG_END = "[/IMG]"
IMAGE = "<image>"          # one visual embedding of an image
GIMG = "[gIMG]"            # one visual embedding of a video frame
GIMG_END = "[/gIMG]"
EOC = "[EOC]"
VIDEO = "[VIDEO]"
GROUNDING = "<grounding>"
PHRASE, PHRASE_END = "<phrase>", "</phrase>"
OBJECT, OBJECT_END = "<object>", "</object>"
DELIMITER_OF_MULTI_OBJECTS = "</delimiter_of_multi_objects/>"
REC = "<REC>"
#: Box coordinates are quantised to 0..256 and written as one token each (official lm.py).
COORDINATE_BINS = 257
PATCH_INDEX = tuple(f"<patch_index_{i:04d}>" for i in range(COORDINATE_BINS))
USER, ASSISTANT = "[USER]", "[ASSISTANT]"

SPECIAL_TOKENS: tuple[str, ...] = (
    PAD, IMG, IMG_END, IMAGE, GIMG, GIMG_END, EOC, VIDEO,
    GROUNDING, PHRASE, PHRASE_END, OBJECT, OBJECT_END, DELIMITER_OF_MULTI_OBJECTS, REC,
    *PATCH_INDEX, USER, ASSISTANT,
)
#: Tokens whose positions carry visual embeddings instead of token embeddings.
VISUAL_PLACEHOLDERS = (IMAGE, GIMG)


def image_placeholder(n_tokens: int) -> str:
    """`[IMG]` + n x `<image>` + `[/IMG]`."""
    return IMG + IMAGE * n_tokens + IMG_END


def video_placeholder(n_frames: int, tokens_per_frame: int) -> str:
    """`[VIDEO]` then one `[IMG]` + n x `[gIMG]` + `[/IMG]` block per frame."""
    return VIDEO + (IMG + GIMG * tokens_per_frame + IMG_END) * n_frames


def add_special_tokens(tokenizer) -> None:
    """Add the Emu2 special tokens that are missing, in the official order, and use `[PAD]` for
    padding. Existing ids are never changed, so a released tokenizer keeps its layout."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    tokenizer.pad_token = PAD


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A small byte-level BPE tokenizer trained offline on `texts` (tests and the tiny preset), with
    LLaMA's first ids (`<unk>`=0, `<s>`=1, `</s>`=2) and the Emu2 special tokens after its vocab."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ConfigError(f"tokenizer vocab_size must be >= 300 (256 bytes + merges), got {vocab_size}")
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>")
    add_special_tokens(tokenizer)
    return tokenizer


def load_tokenizer(path: str | Path):
    """A tokenizer saved with `save_pretrained` (ours, or a LLaMA one), with the special tokens."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"tokenizer folder {path} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    add_special_tokens(tokenizer)
    return tokenizer


def special_ids(tokenizer) -> dict[str, int]:
    """Ids of the markers the model and sequence builder need, checked to exist."""
    names = (PAD, IMG, IMG_END, IMAGE, GIMG, VIDEO, USER, ASSISTANT)
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in names}
    unknown = [name for name, i in ids.items() if i is None or i == tokenizer.unk_token_id]
    if unknown:
        raise ConfigError(f"tokenizer lacks the special tokens {unknown}; build it with add_special_tokens")
    return ids
