"""Text pieces through a LLaMA-2-style SentencePiece tokenizer (legacy, dummy prefix): encoding
each piece on its own must not put stray "▁" tokens between text and image spans
(emu.data.sequence, "Text and spacing"). The tokenizer is trained offline here."""

import random

import pytest
from tokenizers import Tokenizer, normalizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from emu.data.schema import Chat, Pair, Turn
from emu.data.sequence import SequenceBuilder, SequenceRules, _prefix_anchor
from emu.data.synth import world
from emu.data.tokenizer import add_special_tokens, load_tokenizer, train_tokenizer
from tests.pretrained import corpus, sentencepiece_folder, sentencepiece_without_prefix

N = 3  # <image> tokens per image


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return sentencepiece_folder(tmp_path_factory.mktemp("llama2-tokenizer"), corpus())


@pytest.fixture(scope="module")
def legacy(folder):
    return load_tokenizer(folder)


@pytest.fixture(scope="module")
def old_json(legacy):
    """The same vocabulary with the normaliser of the Llama-2 tokenizer.json files on the Hub
    (Prepend "▁", Replace " " -> "▁", no pre-tokenizer), loaded as a generic fast tokenizer: it
    encodes " caption" as "▁" "▁caption"."""
    core = Tokenizer.from_str(legacy.backend_tokenizer.to_str())
    core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    core.pre_tokenizer = None
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    add_special_tokens(tok)
    return tok


def png() -> bytes:
    return world.encode(world.render(world.sample_scene(random.Random(0), size=8)), "png")


def pieces(tok, ref, *parts) -> list[int]:
    """Expected ids: marker tokens as given, each text piece as the prefix-free SentencePiece
    model encodes it (its ids inside a longer text)."""
    ids = []
    for part in parts:
        ids += tok.convert_tokens_to_ids(part) if isinstance(part, list) else ref.encode(part)
    return ids


def image(n: int = N) -> list:
    return [["[IMG]"], ["<image>"] * n, ["[/IMG]"]]


def test_the_folder_loads_as_a_legacy_llama_tokenizer_with_sentencepiece_ids(folder, legacy):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    assert type(legacy).__name__ == "LlamaTokenizer" and legacy.legacy is True
    assert [legacy.convert_ids_to_tokens(i) for i in range(sp.get_piece_size())] == \
        [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    # the problem the builder works around: alone, ":" gets the dummy prefix as a token of its own
    assert legacy.convert_ids_to_tokens(legacy(":", add_special_tokens=False).input_ids) == ["▁", ":"]
    assert _prefix_anchor(legacy) is not None


@pytest.mark.parametrize("which", ["legacy", "old_json"])
def test_caption_pair_has_no_stray_prefix_token(request, folder, which):
    tok = request.getfixturevalue(which)
    ref = sentencepiece_without_prefix(folder)
    b = SequenceBuilder(tok, SequenceRules(mode="caption", image_tokens=N, frame_tokens=2, max_len=256))
    s = b.build(Pair(key="p", images=[png()], text="  a red circle above a blue square "), random.Random(0))[0]
    want = [tok.bos_token_id, *pieces(tok, ref, *image(), " a red circle above a blue square"), tok.eos_token_id]
    assert s.ids == want
    assert tok.convert_ids_to_tokens(s.ids[N + 3:N + 5]) == ["▁a", "▁red"]
    assert tok.convert_tokens_to_ids("▁") not in s.ids


@pytest.mark.parametrize("which", ["legacy", "old_json"])
def test_chat_markers_and_text_join_without_stray_prefix_tokens(request, folder, which):
    tok = request.getfixturevalue(which)
    ref = sentencepiece_without_prefix(folder)
    b = SequenceBuilder(tok, SequenceRules(mode="chat", image_tokens=N, frame_tokens=2, max_len=256,
                                           system_messages={"chat": "You are a helpful assistant."}))
    chat = Chat(key="c", images=[png()], turns=[Turn("user", "<image> What color is the shape?"),
                                                Turn("assistant", "red")])
    s = b.build(chat, random.Random(0))[0]
    want = [tok.bos_token_id, *pieces(tok, ref, " You are a helpful assistant.", ["[USER]"], ":", *image(),
                                      " What color is the shape?", ["[ASSISTANT]"], ":", " red"), tok.eos_token_id]
    assert s.ids == want
    assert tok.convert_tokens_to_ids("▁") not in s.ids
    # ":" right after [USER] is the bare ":" piece, as inside "[USER]: ..." written as one string
    user = s.ids.index(tok.convert_tokens_to_ids("[USER]"))
    assert tok.convert_ids_to_tokens(s.ids[user + 1]) == ":"


def test_ids_equal_the_non_legacy_tokenization_of_the_whole_prompt(folder, legacy):
    """What inference feeds the model (a prompt written as one string, special tokens recognised,
    LLaMA's non-legacy handling of text after a special token) matches the training sequence."""
    whole = AutoTokenizer.from_pretrained(str(folder), legacy=False, local_files_only=True)
    add_special_tokens(whole)
    b = SequenceBuilder(legacy, SequenceRules(mode="chat", image_tokens=N, frame_tokens=2, max_len=256,
                                              system_messages={"chat": "You are a helpful assistant."}))
    chat = Chat(key="c", images=[png()], turns=[Turn("user", "<image> What color is the shape?"),
                                                Turn("assistant", "The circle is red.")])
    s = b.build(chat, random.Random(0))[0]
    prompt = (f"<s> You are a helpful assistant.[USER]:[IMG]{'<image>' * N}[/IMG] What color is the shape?"
              "[ASSISTANT]: The circle is red.</s>")
    assert whole(prompt, add_special_tokens=False).input_ids == s.ids


def test_byte_level_tokenizers_encode_pieces_as_they_are():
    tok = train_tokenizer(corpus(50), 400)
    assert _prefix_anchor(tok) is None


def test_the_saved_and_reloaded_tokenizer_builds_the_same_sequences(folder, legacy, tmp_path):
    """Later stages read the tokenizer an exported model folder holds (save_pretrained, then
    load_model_tokenizer): it must build exactly the sequences stage 1 built."""
    from emu.data.tokenizer import load_model_tokenizer

    legacy.save_pretrained(str(tmp_path / "tokenizer"))
    again = load_model_tokenizer(tmp_path / "tokenizer")
    rules = SequenceRules(mode="chat", image_tokens=N, frame_tokens=2, max_len=256,
                          system_messages={"chat": "You are a helpful assistant."})
    chat = Chat(key="c", images=[png()], turns=[Turn("user", "<image> What color is the shape?"),
                                                Turn("assistant", "The circle is red.")])
    pair = Pair(key="p", images=[png()], text="a red circle")
    for mode, sample in (("chat", chat), ("caption", pair)):
        a = SequenceBuilder(legacy, SequenceRules(**{**rules.__dict__, "mode": mode})).build(sample, random.Random(0))
        b = SequenceBuilder(again, SequenceRules(**{**rules.__dict__, "mode": mode})).build(sample, random.Random(0))
        assert a[0].ids == b[0].ids and a[0].targets == b[0].targets
