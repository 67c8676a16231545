"""A plain webdataset (`--format webdataset`): shards written by webdataset's own TarWriter, as
public image-text datasets are published, imported with the real runner.

Captions come from `{key}.txt`, else from a settable `.json` field; the `.json` is optional. Bad
samples are rejected by key and rule while their neighbours are imported.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
import webdataset as wds

from emu.config import resolve
from emu.data.formats import ImportConfig
from emu.data.importing import TooFewKept, run_import
from emu.data.schema import Pair
from emu.data.synth import world
from emu.errors import ConfigError, SourceError
from tests.unit._fixtures_web import import_source


def picture(seed: int, fmt: str = "jpg") -> bytes:
    return world.encode(world.render(world.sample_scene(random.Random(seed))), fmt)


def write_shard(path: Path, samples: list[dict]) -> None:
    """One shard through webdataset.TarWriter, exactly as a dataset publisher would write it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


@pytest.fixture
def published(tmp_path) -> Path:
    """A CC3M-style upload: `train/00000.tar`, `train/00001.tar`; some samples carry a `.txt`
    and a `.json` record (with its own `key`, as most writers store it), some only a `.txt`,
    some only the `.json`, and one a PNG."""
    root = tmp_path / "published"
    write_shard(root / "train" / "00000.tar", [
        {"__key__": "000000000", "jpg": picture(0), "txt": "a red circle",
         "json": {"key": "000000000", "url": "https://example.com/0.jpg", "caption": "a red circle"}},
        {"__key__": "000000001", "jpg": picture(1), "txt": "a blue square"},
        {"__key__": "000000002", "png": picture(2, "png"), "json": {"caption": "a green triangle", "width": 64}},
    ])
    write_shard(root / "train" / "00001.tar", [
        {"__key__": "000010000", "jpeg": picture(3), "txt": "two shapes",
         "json": {"key": "000010000", "similarity": 0.31}},
    ])
    return root


def test_tarwriter_shards_import_without_rejects(published, tmp_path):
    summary, samples, rejects = import_source("webdataset", published, tmp_path / "out")

    assert rejects == [] and summary.samples == 4
    assert [(s.key, s.text, s.source) for s in samples] == [
        ("000000000", "a red circle", "train/00000.tar:000000000"),
        ("000000001", "a blue square", "train/00000.tar:000000001"),
        ("000000002", "a green triangle", "train/00000.tar:000000002"),
        ("000010000", "two shapes", "train/00001.tar:000010000")]
    assert all(isinstance(s, Pair) and s.media == "image" for s in samples)
    assert samples[0].images == [picture(0)] and samples[2].images == [picture(2, "png")]
    assert samples[0].meta == {"url": "https://example.com/0.jpg", "caption": "a red circle"}
    assert samples[1].meta == {} and samples[3].meta == {"similarity": 0.31}


def test_src_may_be_one_shard(published, tmp_path):
    summary, samples, rejects = import_source("webdataset", published / "train" / "00001.tar", tmp_path / "out")
    assert rejects == [] and [(s.key, s.source) for s in samples] == [("000010000", "00001.tar:000010000")]


def test_caption_field_setting(tmp_path):
    """LAION-style records without a .txt: the caption is the json field the setting names."""
    src = tmp_path / "laion"
    write_shard(src / "part-0.tar", [
        {"__key__": f"{i:05d}", "webp": _webp(i), "json": {"TEXT": f"caption {i}", "key": f"{i:05d}"}}
        for i in range(3)])

    summary, samples, rejects = import_source("webdataset", src, tmp_path / "out", "webdataset.caption_field=TEXT")

    assert rejects == [] and [s.text for s in samples] == ["caption 0", "caption 1", "caption 2"]
    with pytest.raises(TooFewKept, match="kept 0 of 3 records; rejected: text_missing: 3"):
        import_source("webdataset", src, tmp_path / "default")
    message = json.loads((tmp_path / "default" / "rejects.jsonl").read_text().splitlines()[0])["message"]
    assert message == ("no caption: looked for a 00000.txt member and a string 'caption' in 00000.json "
                       "(import.webdataset.text_member / caption_field)")


def test_text_member_setting(tmp_path):
    src = tmp_path / "src"
    write_shard(src / "0.tar", [{"__key__": "a", "jpg": picture(0), "caption": "from the caption member",
                                 "txt": "ignored"}])
    _, samples, rejects = import_source("webdataset", src, tmp_path / "out", "webdataset.text_member=caption")
    assert rejects == [] and samples[0].text == "from the caption member"


def test_bad_samples_are_rejected_by_key_and_rule(tmp_path):
    src = tmp_path / "src"
    write_shard(src / "00000.tar", [
        {"__key__": "good", "jpg": picture(0), "txt": "a red circle", "json": {"key": "good"}},
        {"__key__": "moved", "jpg": picture(1), "txt": "a blue square", "json": {"key": "other"}},
        {"__key__": "mute", "jpg": picture(2), "json": {"url": "u"}},
        {"__key__": "twice", "jpg": picture(3), "png": picture(3, "png"), "txt": "which one"},
        {"__key__": "blind", "txt": "no image"},
        {"__key__": "broken", "jpg": picture(4), "txt": "x", "json": b"{not json"},
        {"__key__": "latin1", "jpg": picture(5), "txt": "caf\xe9".encode("latin-1")},
        {"__key__": "good2", "jpg": picture(6), "txt": "a green triangle"},
    ])

    summary, samples, rejects = import_source("webdataset", src, tmp_path / "out")

    assert [s.key for s in samples] == ["good", "good2"] and summary.samples == 2
    assert [(r["key"], r["rule"], r["source"]) for r in rejects] == [
        ("moved", "key_mismatch", "00000.tar:moved"),
        ("mute", "text_missing", "00000.tar:mute"),
        ("twice", "image_ambiguous", "00000.tar:twice"),
        ("blind", "image_missing", "00000.tar:blind"),
        ("broken", "record_not_json", "00000.tar:broken"),
        ("latin1", "text_not_utf8", "00000.tar:latin1")]
    assert rejects[0]["message"] == "moved.json names key 'other', but its tar members are named 'moved'"


def test_unreadable_sources(tmp_path):
    with pytest.raises(SourceError, match="holds no webdataset shards"):
        (tmp_path / "empty").mkdir()
        run_import("webdataset", tmp_path / "empty", tmp_path / "out", ImportConfig())
    (tmp_path / "x.zip").write_bytes(b"PK")
    with pytest.raises(SourceError, match="is not a .tar shard"):
        run_import("webdataset", tmp_path / "x.zip", tmp_path / "out", ImportConfig())


@pytest.mark.parametrize("overrides, message", [
    (["webdataset.text_member=", "webdataset.caption_field="], "are both empty"),
    (["webdataset.text_member=jpg"], "must name a text member, not 'jpg'"),
])
def test_options_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve(ImportConfig, "import", None, overrides)


def _webp(seed: int) -> bytes:
    out = io.BytesIO()
    world.render(world.sample_scene(random.Random(seed))).save(out, format="WEBP")
    return out.getvalue()

