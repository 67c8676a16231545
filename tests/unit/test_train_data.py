"""Training data streams and the per-type mixture: discovery from manifests, deterministic epochs,
exact rank splits, bit-identical resume, routing of mixed datasets, and errors that name the fix."""

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

import emu.train.data as data_mod
from emu.data.datatypes import DATA_TYPES, data_type_of
from emu.data.schema import Interleaved, Pair, Segment, TextOnly
from emu.data.shards import SampleProblem, ShardWriter
from emu.errors import ConfigError
from emu.train.data import (Mixture, TypeStream, build_mixture, discover, permutation, rank_share,
                            sample_counts)


def png(i: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (4, 4), (i % 256, (i * 7) % 256, 3)).save(out, format="PNG")
    return out.getvalue()


def write(folder: Path, samples, per_shard: int) -> Path:
    with ShardWriter(folder, "test", samples_per_shard=per_shard) as writer:
        for s in samples:
            writer.write(s)
        writer.close()
    return folder


def image_pair(key, i):
    return Pair(key=key, images=[png(i)], text=f"image {key}")


def video_pair(key, i):
    return Pair(key=key, images=[png(i), png(i + 1)], text=f"video {key}", media="video")


def text(key, i):
    return TextOnly(key=key, text=f"text {key} " * (i % 3 + 1))


def interleaved(key, i):
    return Interleaved(key=key, images=[png(i)], segments=[Segment(text=f"doc {key}"), Segment(image=0)])


# Samples per type over the whole tree built below.
N_IMAGE, N_VIDEO, N_TEXT, N_INTERLEAVED = 23 + 6, 9, 9 + 5, 4


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """root/pairs (image pairs, 6 shards), root/mixed/web (video pairs, image pairs, interleaved
    and text mixed within 6 shards) and root/text (3 shards); root/notes holds no dataset."""
    root = tmp_path_factory.mktemp("data")
    write(root / "pairs", [image_pair(f"img{i:03d}", i) for i in range(23)], per_shard=4)
    makers = [video_pair] * 9 + [image_pair] * 6 + [interleaved] * 4 + [text] * 9
    mixed = [makers[(i * 11) % 28](f"mix{i:03d}", 100 + i) for i in range(28)]  # types interleaved
    write(root / "mixed" / "web", mixed, per_shard=5)
    write(root / "text", [text(f"txt{i:03d}", i) for i in range(5)], per_shard=2)
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not a dataset")
    return root


def keys(samples):
    return [s.key for s in samples]


def stream(data, t, seed=0, rank=0, world=1):
    return TypeStream(t, discover([data])[t], seed, rank, world)


# ---------------------------------------------------------------------------------------------
# Discovery


def test_discover_finds_datasets_recursively_and_counts_types_per_shard(data):
    found = discover([data])
    assert list(found) == ["image_text", "video_text", "interleaved", "text"]  # DATA_TYPES order
    assert [d.path for d in found["image_text"]] == [data / "mixed" / "web", data / "pairs"]  # sorted
    assert sample_counts(found) == {"image_text": N_IMAGE, "video_text": N_VIDEO,
                                    "interleaved": N_INTERLEAVED, "text": N_TEXT}
    mixed = found["video_text"][0]
    assert mixed is found["text"][0] and len(mixed.shards) == 6
    assert sum(s.samples for s in mixed.shards) == 28
    assert all(sum(s.counts.values()) == s.samples for s in mixed.shards)
    # A folder that is itself a dataset is taken as it is.
    assert [d.path for d in discover([data / "pairs"])["image_text"]] == [data / "pairs"]


def test_discover_reads_only_the_manifest_columns_it_needs(data, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("discover must not read tars or decode samples")

    monkeypatch.setattr(data_mod, "iter_raw_samples", forbidden)
    monkeypatch.setattr(data_mod, "decode_sample", forbidden)
    read = []
    real = data_mod.pq.read_table
    monkeypatch.setattr(data_mod.pq, "read_table", lambda path, columns=None: read.append(tuple(columns))
                        or real(path, columns=columns))
    discover([data])
    assert read and set(read) == {("kind", "n_frames")}


def test_discover_errors_name_the_folder(data, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        discover([tmp_path / "nope"])
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"empty holds no dataset.*dataset\.json"):
        discover([tmp_path / "empty"])
    with pytest.raises(ConfigError, match="reached twice"):
        discover([data, data / "pairs"])


# ---------------------------------------------------------------------------------------------
# Order


def test_permutation_is_pinned():
    # The order of every run depends on this function: a change would break resuming old runs.
    assert permutation(10, 12345) == [2, 5, 4, 7, 6, 3, 8, 0, 9, 1]
    assert sorted(permutation(1000, 7)) == list(range(1000))


@pytest.mark.parametrize("t,n", [("image_text", N_IMAGE), ("video_text", N_VIDEO), ("text", N_TEXT)])
def test_each_epoch_holds_every_sample_of_the_type_once(data, t, n):
    s = stream(data, t)
    assert s.epoch_size == n
    samples = s.take(3 * n)
    epochs = [keys(samples[e * n:(e + 1) * n]) for e in range(3)]
    for epoch in epochs:
        assert len(set(epoch)) == n
        assert set(epoch) == set(epochs[0])
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]  # each epoch has its own order
    assert all(data_type_of(x) == t for x in samples)  # a mixed dataset yields only this type


def test_same_seed_same_order_other_seed_other_order(data):
    a = keys(stream(data, "image_text", seed=1).take(N_IMAGE))
    assert a == keys(stream(data, "image_text", seed=1).take(N_IMAGE))
    assert a != keys(stream(data, "image_text", seed=2).take(N_IMAGE))
    # Another type with the same seed is not in lock-step with this one.
    v = keys(stream(data, "video_text", seed=1).take(N_VIDEO))
    assert v == keys(stream(data, "video_text", seed=1).take(N_VIDEO))


def test_shards_are_shuffled_and_samples_shuffled_within_them(data):
    s = stream(data, "image_text", seed=3)
    shard_of = {}
    for ref in s.shards:
        for key in data_mod._read_manifest(ref.manifest, ["key"]).column("key").to_pylist():
            shard_of[key] = ref.path
    orders = []
    for _ in range(4):
        epoch = keys(s.take(N_IMAGE))
        blocks = [shard_of[k] for k in epoch]
        runs = [p for i, p in enumerate(blocks) if i == 0 or p != blocks[i - 1]]
        assert len(runs) == len(set(runs)) == len(s.shards)  # each shard is read as one block
        orders.append((runs, epoch))
    assert any(runs != [r.path for r in s.shards] for runs, _ in orders)  # shard order shuffled
    assert any(sorted(e) != e for _, e in orders)  # samples shuffled
    # Within-shard order differs between epochs too (for some shard).
    biggest = max(s.shards, key=lambda ref: ref.counts["image_text"]).path
    within = [[k for k in e if shard_of[k] == biggest] for _, e in orders]
    assert len({tuple(w) for w in within}) > 1


def test_video_and_image_pairs_are_routed_by_frames(data):
    videos = stream(data, "video_text").take(N_VIDEO)
    images = stream(data, "image_text").take(N_IMAGE)
    assert all(isinstance(v, Pair) and v.media == "video" and len(v.images) == 2 for v in videos)
    assert all(isinstance(i, Pair) and i.media == "image" for i in images)
    assert {k[:3] for k in keys(images)} == {"img", "mix"}
    inter = stream(data, "interleaved").take(N_INTERLEAVED)
    assert all(isinstance(x, Interleaved) for x in inter)


# ---------------------------------------------------------------------------------------------
# Ranks


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_split_the_global_order_exactly(data, world):
    n = 2 * N_IMAGE + 5  # across an epoch boundary, N_IMAGE not divisible by world
    single = keys(stream(data, "image_text", seed=4).take(n))
    per_rank = [keys(stream(data, "image_text", seed=4, rank=r, world=world).take(len(single[r::world])))
                for r in range(world)]
    for r in range(world):
        assert per_rank[r] == single[r::world]


def test_rank_shares_sum_to_the_global_batch():
    for world in (1, 2, 3, 4, 7):
        for batch in (0, 1, 2, 5, 12, 13):
            for start in range(0, 30):
                shares = [rank_share(batch, start, r, world) for r in range(world)]
                assert sum(shares) == batch and max(shares) - min(shares) <= 1
    assert [rank_share(5, 0, r, 2) for r in range(2)] == [3, 2]  # lower ranks first at step 0


@pytest.mark.parametrize("world", [2, 3])
def test_mixture_ranks_together_take_exactly_the_single_process_batches(data, world):
    sizes = {"image_text": 5, "video_text": 3, "text": 1, "interleaved": 2, "chat": 0}
    single = build_mixture([data], sizes, seed=9)
    ranks = [build_mixture([data], sizes, seed=9, rank=r, world=world) for r in range(world)]
    seen = Counter()
    for _ in range(12):  # > 2 epochs of video_text and interleaved
        shares = [m.shares() for m in ranks]
        for t, b in sizes.items():
            assert sum(s.get(t, 0) for s in shares) == b
        expected = single.next_batch()
        got = [m.next_batch() for m in ranks]
        assert [len(g) for g in got] == [sum(s.values()) for s in shares]
        union = [k for g in got for k in keys(g)]
        assert Counter(union) == Counter(keys(expected))  # disjoint, and together the same batch
        for g in got:  # types in a fixed order within a batch
            types = [DATA_TYPES.index(data_type_of(x)) for x in g]
            assert types == sorted(types)
        seen.update(union)
    assert all(m.state() == single.state() for m in ranks)  # the state is rank-independent
    # 12 steps x 2 interleaved = 6 epochs of 4: every interleaved sample seen exactly 6 times.
    documents = keys(stream(data, "interleaved").take(N_INTERLEAVED))
    assert [seen[k] for k in documents] == [6] * N_INTERLEAVED


# ---------------------------------------------------------------------------------------------
# Resume


SIZES = {"image_text": 5, "video_text": 2, "interleaved": 3, "text": 2}


@pytest.mark.parametrize("steps_before", [0, 1, 4, 7])
def test_resume_continues_bit_identically(data, steps_before):
    uninterrupted = build_mixture([data], SIZES, seed=5)
    expected = [uninterrupted.next_batch() for _ in range(steps_before + 6)][steps_before:]

    first = build_mixture([data], SIZES, seed=5)
    for _ in range(steps_before):
        first.next_batch()
    saved = json.loads(json.dumps(first.state()))  # as written to a checkpoint
    resumed = build_mixture([data], SIZES, seed=5)
    resumed.restore(saved)
    got = [resumed.next_batch() for _ in range(6)]
    assert got == expected  # Sample equality: every field and every image byte
    assert resumed.step == steps_before + 6
    # 6 + 7 steps of 2 video pairs cross the 9-sample epoch boundary, as do interleaved ones.
    assert resumed.epochs()["video_text"] > 1 and resumed.state()["types"]["video_text"]["epoch"] >= 1


def test_resume_under_another_world_size(data):
    two = [build_mixture([data], SIZES, seed=6, rank=r, world=2) for r in range(2)]
    for _ in range(3):
        for m in two:
            m.next_batch()
    saved = json.loads(json.dumps(two[0].state()))
    single = build_mixture([data], SIZES, seed=6)
    for _ in range(3):
        single.next_batch()
    expected = [single.next_batch() for _ in range(4)]
    resumed = build_mixture([data], SIZES, seed=6)
    resumed.restore(saved)
    assert [resumed.next_batch() for _ in range(4)] == expected


def test_stream_state_names_epoch_shard_and_sample_and_resumes_mid_shard(data):
    s = stream(data, "image_text", seed=8, rank=1, world=2)
    s.take(N_IMAGE // 2 + 3)  # into the second epoch, mid-shard
    state = json.loads(json.dumps(s.state()))
    assert state["epoch"] == 1 and state["position"] == 1 + 2 * (N_IMAGE // 2 + 3)
    assert {"shard_pos", "sample_pos", "shard"} <= set(state)
    expected = s.take(10)
    fresh = stream(data, "image_text", seed=8, rank=1, world=2)
    fresh.restore(state)
    assert fresh.take(10) == expected
    with pytest.raises(ConfigError, match="rank 1 of 2"):
        stream(data, "image_text", seed=8, rank=0, world=2).restore(state)
    with pytest.raises(ConfigError, match="seed 8"):
        stream(data, "image_text", seed=9, rank=1, world=2).restore(state)


def test_resume_skips_without_decoding(data, monkeypatch):
    s = stream(data, "text", seed=2)
    s.take(7)
    state = s.state()
    assert state["sample_pos"] > 0 or state["shard_pos"] > 0
    calls = []
    real = data_mod.decode_sample
    monkeypatch.setattr(data_mod, "decode_sample", lambda raw: calls.append(raw.key) or real(raw))
    fresh = stream(data, "text", seed=2)
    fresh.restore(state)
    fresh.take(1)
    assert len(calls) == 1


def test_resume_refuses_changed_data_or_types(data, tmp_path):
    m = build_mixture([data], SIZES, seed=1)
    m.next_batch()
    state = m.state()
    # The same data listed through other folders, in another order: the same stream.
    other = build_mixture([data / "text", data / "pairs", data / "mixed"], SIZES, seed=1)
    other.restore(state)
    assert other.next_batch() == m.next_batch()
    fewer = build_mixture([data / "mixed", data / "text"], SIZES, seed=1)
    with pytest.raises(ConfigError, match="image_text data changed"):
        fewer.restore(state)
    with pytest.raises(ConfigError, match="same data types"):
        build_mixture([data], {**SIZES, "text": 0}, seed=1).restore(state)


# ---------------------------------------------------------------------------------------------
# Memory and failure


def test_streams_read_one_shard_at_a_time_and_lazily(data, monkeypatch):
    opened, open_now, peak = [], [0], [0]
    real = data_mod.iter_raw_samples

    def counting(path, *args, **kwargs):
        opened.append(path)
        open_now[0] += 1
        peak[0] = max(peak[0], open_now[0])
        try:
            yield from real(path, *args, **kwargs)
        finally:
            open_now[0] -= 1

    monkeypatch.setattr(data_mod, "iter_raw_samples", counting)
    s = stream(data, "image_text", seed=0)
    assert opened == []  # building a stream reads no tar
    first = next(s)
    assert len(opened) == 1 and open_now[0] == 0
    assert s._buffer and all(raw.shard == opened[0].name for _, raw, _ in s._buffer)
    s.take(N_IMAGE - 1)
    assert peak[0] == 1 and len(opened) == len(s.shards)  # each shard read once per epoch
    assert first.key in keys(s.take(N_IMAGE))


def test_a_sample_that_does_not_decode_stops_training_naming_shard_and_key(tmp_path):
    ds = write(tmp_path / "ds", [text(f"t{i}", i) for i in range(4)], per_shard=2)
    shard = ds / "shard-000001.tar"
    members = []
    with tarfile.open(shard) as tar:
        for info in tar:
            data = tar.extractfile(info).read()
            members.append((info, b"{not json" if info.name == "t3.json" else data))
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    s = TypeStream("text", discover([ds])["text"], seed=0)
    with pytest.raises(SampleProblem, match=r"shard-000001\.tar key 't3': .*not JSON"):
        s.take(4)


# ---------------------------------------------------------------------------------------------
# Configuration errors before training


def test_missing_type_names_it_its_batch_size_the_folders_and_what_is_present(data):
    with pytest.raises(ConfigError) as err:
        build_mixture([data / "pairs", data / "text"], {"image_text": 4, "video_text": 2}, seed=0)
    message = str(err.value)
    assert "batch_sizes.video_text = 2" in message and str(data / "pairs") in message
    assert str(data / "text") in message
    assert "image_text (23 samples)" in message and "text (5 samples)" in message
    # A type with batch size 0 needs no data.
    m = build_mixture([data / "pairs"], {"image_text": 4, "video_text": 0}, seed=0)
    assert m.types == ("image_text",) and len(m.next_batch()) == 4


def test_unknown_type_lists_the_valid_ones(data):
    with pytest.raises(ConfigError, match=r"'image_pairs'.*image_text, video_text, interleaved"):
        build_mixture([data], {"image_pairs": 4}, seed=0)


def test_empty_folder_and_bad_rank_are_config_errors(data, tmp_path):
    with pytest.raises(ConfigError, match="holds no dataset"):
        build_mixture([tmp_path], {"text": 1}, seed=0)
    with pytest.raises(ConfigError, match="rank"):
        build_mixture([data], {"text": 1}, seed=0, rank=2, world=2)
    with pytest.raises(ConfigError, match="at least one"):
        build_mixture([data], {"text": 0}, seed=0)


def test_mixture_takes_fresh_streams_of_its_rank(data):
    s = stream(data, "text", rank=0, world=2)
    with pytest.raises(ConfigError, match="rank 0 of 2"):
        Mixture({"text": s}, {"text": 2}, rank=1, world=2)
    s.take(1)
    with pytest.raises(ConfigError, match="fresh"):
        Mixture({"text": s}, {"text": 2}, rank=0, world=2)
