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


def base_vocab_size(tokenizer) -> int:
    """How many tokens the tokenizer had before Emu added its own (prepare_tokenizer records it;
    otherwise: every id but those of the Emu2 special tokens, which come after the vocabulary)."""
    shipped = getattr(tokenizer, "_emu_shipped_size", None)
    if shipped is not None:
        return shipped
    special = set(SPECIAL_TOKENS)
    return 1 + max(i for token, i in tokenizer.get_vocab().items() if token not in special)


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


def prepare_tokenizer(tokenizer, source: str) -> None:
    """Make a pretrained LM's own tokenizer ready for Emu (emu.model.pretrained): the Emu2 special
    tokens added after its vocabulary (add_special_tokens; `[PAD]` pads, as in Emu2), and a BOS
    for tokenizers that have none (Qwen2): its EOS, which such models already use to separate
    documents. A tokenizer without EOS is refused: every Emu sequence ends with it. `source`
    names the file or setting in the error."""
    if tokenizer.eos_token is None:
        raise ConfigError(f"{source}: the tokenizer has no EOS token (eos_token in tokenizer_config.json); Emu "
                          "ends every sequence with it")
    if tokenizer.bos_token is None:
        tokenizer.bos_token = tokenizer.eos_token
    # The LM's rows below this id belong to the tokenizer as shipped (trained, Emu2 tokens
    # included when it already had them); rows at or above it are new (emu.model.emu.build_lm).
    tokenizer._emu_shipped_size = len(tokenizer)
    add_special_tokens(tokenizer)


def load_tokenizer(path: str | Path, setting: str = "tokenizer"):
    """A tokenizer folder (ours, or a pretrained LM's: LLaMA SentencePiece, Llama-3 / Qwen2
    byte-level BPE) made ready for Emu by `prepare_tokenizer`. Errors name `setting` and the folder."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{setting}: tokenizer folder {path} does not exist")
    tokenizer = _read_tokenizer(path, setting)
    prepare_tokenizer(tokenizer, f"{setting} ({path})")
    return tokenizer


def load_model_tokenizer(path: str | Path):
    """The tokenizer of an Emu model folder (emu.model.io), as `save_model` wrote it: it must
    already hold the Emu2 special tokens and a pad token, since the LM's embedding rows were made
    for exactly that vocabulary (adding tokens here would silently shift it)."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"tokenizer folder {path} does not exist")
    tokenizer = _read_tokenizer(path, "the model's tokenizer")
    config = path / "tokenizer_config.json"
    if tokenizer.pad_token is None:
        raise ConfigError(f"{config}: the tokenizer has no pad token; an Emu model's tokenizer pads with {PAD} "
                          "(emu.data.tokenizer.add_special_tokens, which save_model's tokenizers went through)")
    missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        raise ConfigError(f"{config}: the tokenizer lacks {len(missing)} Emu2 special tokens ({', '.join(missing[:4])}"
                          f"{' ...' if len(missing) > 4 else ''}); it does not belong to an Emu model")
    if tokenizer.bos_token is None or tokenizer.eos_token is None:
        raise ConfigError(f"{config}: the tokenizer has no {'BOS' if tokenizer.bos_token is None else 'EOS'} token")
    return tokenizer


def _read_tokenizer(path: Path, setting: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{setting}: {path} holds no tokenizer transformers can load (tokenizer.json, "
                          f"tokenizer.model or vocab files with tokenizer_config.json): {first}") from None


def special_ids(tokenizer) -> dict[str, int]:
    """Ids of the markers the model and sequence builder need, checked to exist."""
    names = (PAD, IMG, IMG_END, IMAGE, GIMG, VIDEO, USER, ASSISTANT)
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in names}
    unknown = [name for name, i in ids.items() if i is None or i == tokenizer.unk_token_id]
    if unknown:
        raise ConfigError(f"tokenizer lacks the special tokens {unknown}; build it with add_special_tokens")
    return ids
