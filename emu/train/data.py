"""Streaming, deterministic, resumable training data: one stream per data type, mixed per step.

Emu2 gives each data type its own global batch size per step (§2.2.2: stage 2 takes 12,800
image-text pairs, 6,400 video-text pairs, 3,200 interleaved and 800 text-only samples per step),
so the unit of sampling is a data type (emu.data.datatypes), not a dataset.

Order. A `TypeStream` reads every shard that holds samples of its type, across all datasets, as an
infinite sequence of epochs. Epoch e's order comes from (seed, data type, e) and the data's content
alone (shards are identified by sha256, not by path): the shards are shuffled, then the type's
samples inside each shard are shuffled. Concatenating the epochs gives the type's *global order*;
position g in it is sample (g mod N) of epoch g // N, N being the number of samples of the type.

Ranks. Rank r reads the positions g with g % world == r. The Mixture's step s takes, per type, the
window [W, W + B) of the global order (B the type's global batch size, W = s * B while B is
unchanged), and each rank takes its positions in the window, so the ranks' batches at every step
are disjoint and together exactly the batch world=1 takes. When world does not divide B, the
ranks whose turn comes first in the window take one sample more; the extra sample rotates with the
window start, so the ranks' running totals never differ by more than one.

Resume. The Mixture's state is, per type, the window start W: it is the same on every rank and
independent of the world size, so one saved state restores every rank (even under another world
size). A stream seeks to the first position >= W that belongs to its rank; reaching it reads the
shard's tar once but keeps (and decodes) only the samples it will yield: nothing is decoded to skip.

Memory. A stream holds one shard at a time, and of that shard only the raw samples of its type
that its rank will yield. Discovery reads the manifests' `kind` and `n_frames` columns only.

Shuffling uses its own small PRNG (splitmix64 seeded by BLAKE2b) rather than numpy or `random`, so
an order never changes with a library upgrade and a resumed run stays bit-identical.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
from collections import Counter, deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from emu.data.datatypes import DATA_TYPES, data_type, data_type_of
from emu.data.schema import Sample
from emu.data.shards import (DATASET_FILE, Problem, RawSample, SampleProblem, decode_sample, iter_raw_samples,
                             list_shards, read_index)
from emu.errors import ConfigError, DatasetError

STATE_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Discovery


@dataclass(frozen=True, eq=False)
class ShardRef:
    """One shard and how many samples of each data type it holds (from its manifest)."""

    path: Path          # the .tar
    manifest: Path      # its per-shard parquet manifest
    sha256: str         # from dataset.json: identifies the content, wherever the folder lives
    samples: int
    counts: Mapping[str, int]  # data type -> samples of that type


@dataclass(frozen=True, eq=False)
class DatasetRef:
    """A finished dataset folder (one with dataset.json) and its shards in read order."""

    path: Path
    source_format: str
    shards: tuple[ShardRef, ...] = field(repr=False)

    @property
    def counts(self) -> dict[str, int]:
        """Samples per data type over the whole dataset, in DATA_TYPES order."""
        total: Counter[str] = Counter()
        for shard in self.shards:
            total.update(shard.counts)
        return {t: total[t] for t in DATA_TYPES if total[t]}

    def count(self, data_type: str) -> int:
        return sum(s.counts.get(data_type, 0) for s in self.shards)


def discover(data_dirs: list[Path], require_shards: bool = True) -> dict[str, list[DatasetRef]]:
    """The datasets under `data_dirs` and which data types they hold, keyed by data type (in
    DATA_TYPES order; only types with samples). A folder is a dataset if it has dataset.json;
    otherwise its sub-folders are searched, recursively and in sorted order (hidden ones skipped).
    A dataset holding several types is listed under each. Only the manifests' `kind` and
    `n_frames` columns are read: no tar, no image.

    `require_shards` false: the folders hold metadata only (dataset.json, manifests), the tars are
    read from elsewhere (emu.precompute.remote reads them from the DVC remote).

    Raises ConfigError for a folder that is missing or holds no dataset, or a dataset reached
    twice (its samples would be read twice per epoch); DatasetError for a broken dataset.
    """
    found: dict[str, list[DatasetRef]] = {}
    seen: dict[Path, Path] = {}
    for data_dir in map(Path, data_dirs):
        if not data_dir.is_dir():
            raise ConfigError(f"data folder {data_dir} does not exist or is not a folder")
        dataset_dirs = _find_datasets(data_dir, set())
        if not dataset_dirs:
            raise ConfigError(f"data folder {data_dir} holds no dataset: neither it nor any sub-folder has a "
                              f"{DATASET_FILE} (a folder without one is not a dataset, or its import did not finish)")
        for dataset_dir in dataset_dirs:
            real = dataset_dir.resolve()
            if real in seen:
                raise ConfigError(f"dataset {dataset_dir} is reached twice (from data folders {seen[real]} and "
                                  f"{data_dir}); give each dataset once, or its samples are read twice per epoch")
            seen[real] = data_dir
            ref = _read_dataset(dataset_dir, require_shards)
            for t in ref.counts:
                found.setdefault(t, []).append(ref)
    return {t: found[t] for t in DATA_TYPES if t in found}


def sample_counts(found: Mapping[str, list[DatasetRef]]) -> dict[str, int]:
    """Samples per data type (one epoch of each type's stream), for logging."""
    return {t: sum(d.count(t) for d in datasets) for t, datasets in found.items()}


def _find_datasets(folder: Path, visited: set[Path]) -> list[Path]:
    real = folder.resolve()
    if real in visited:  # a symlink loop
        return []
    visited.add(real)
    if (folder / DATASET_FILE).is_file():
        return [folder]  # a dataset does not contain datasets: do not look further down
    out: list[Path] = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        out += _find_datasets(sub, visited)
    return out


def _read_dataset(dataset_dir: Path, require_shards: bool = True) -> DatasetRef:
    index = read_index(dataset_dir)
    tars = list_shards(dataset_dir, require_shards)  # checks names (and that every listed tar exists)
    shards = []
    for entry, tar in zip(index.get("shards", []), tars):
        manifest = _manifest_path(dataset_dir, entry)
        table = _read_manifest(manifest, ["kind", "n_frames"])
        if table.num_rows != entry.get("samples"):
            raise DatasetError(f"{manifest} has {table.num_rows} rows but {dataset_dir}/{DATASET_FILE} says "
                               f"{tar.name} holds {entry.get('samples')} samples")
        pairs = Counter(zip(table.column("kind").to_pylist(),
                            (bool(n) for n in table.column("n_frames").to_pylist())))
        counts: Counter[str] = Counter()
        for (kind, is_video), n in pairs.items():
            counts[_row_type(kind, is_video, manifest)] += n
        shards.append(ShardRef(path=tar, manifest=manifest, sha256=str(entry.get("sha256", "")),
                               samples=table.num_rows, counts={t: counts[t] for t in DATA_TYPES if counts[t]}))
    return DatasetRef(path=dataset_dir, source_format=str(index.get("source_format", "")), shards=tuple(shards))


def _manifest_path(dataset_dir: Path, entry: dict[str, Any]) -> Path:
    name = entry.get("manifest", "")
    if not isinstance(name, str) or not name or Path(name).name != name:
        raise DatasetError(f"{dataset_dir}/{DATASET_FILE}: invalid manifest name {name!r} for {entry.get('name')}")
    path = Path(dataset_dir) / name
    if not path.is_file():
        raise DatasetError(f"{dataset_dir}/{DATASET_FILE} lists manifest {name} but the file is missing")
    return path


def _read_manifest(path: Path, columns: list[str]):
    try:
        return pq.read_table(path, columns=columns)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, KeyError... for a broken file
        raise DatasetError(f"cannot read columns {', '.join(columns)} of manifest {path}: {exc}") from None


def _row_type(kind: Any, is_video: bool, manifest: Path) -> str:
    try:
        return data_type(kind, is_video)
    except ValueError:
        rows = _read_manifest(manifest, ["key", "kind"]).to_pylist()
        key = next((r["key"] for r in rows if r["kind"] == kind), "?")
        raise DatasetError(f"{manifest} key {key!r}: sample kind {kind!r} has no data type (a row of a sample "
                           f"that could not be decoded?); training reads validated datasets only") from None


# ---------------------------------------------------------------------------------------------
# Deterministic permutations, independent of library versions

_MASK64 = (1 << 64) - 1


def _seed(*parts: Any) -> int:
    data = json.dumps(["emu.train.data", *parts], separators=(",", ":")).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def permutation(n: int, seed: int) -> list[int]:
    """A permutation of range(n): Fisher-Yates driven by splitmix64 from `seed` (a 64-bit int).
    Fixed forever: changing it would change every run's order and break resuming old runs."""
    out = list(range(n))
    state = seed & _MASK64
    for i in range(n - 1, 0, -1):
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
        j = (z * (i + 1)) >> 64  # multiply-shift: uniform in [0, i] up to a 2^-64 bias
        out[i], out[j] = out[j], out[i]
    return out


# ---------------------------------------------------------------------------------------------
# One data type


class TypeStream:
    """An infinite, deterministic stream of one data type's samples for one rank (see module doc).

    `position` is the global-order position of the next sample this rank yields (always
    `rank` modulo `world`). Iterating decodes each sample with `decode_sample`; a sample that does
    not decode raises SampleProblem naming shard and key: training reads validated data, so bad
    data stops it.
    """

    def __init__(self, data_type: str, datasets: list[DatasetRef], seed: int, rank: int = 0, world: int = 1):
        if data_type not in DATA_TYPES:
            raise ConfigError(f"unknown data type {data_type!r}; data types are: {', '.join(DATA_TYPES)}")
        _check_rank(rank, world)
        self.data_type = data_type
        self.seed = int(seed)
        self.rank = rank
        self.world = world
        self.datasets = list(datasets)
        #: Canonical order, which the epochs' shuffles permute: by content (sha256), so the order
        #: does not depend on folder names or on the order the folders are given in.
        self.shards = sorted((s for d in self.datasets for s in d.shards if s.counts.get(data_type, 0) > 0),
                             key=lambda s: s.sha256)
        self._sizes = [s.counts[data_type] for s in self.shards]
        self.epoch_size = sum(self._sizes)
        if self.epoch_size == 0:
            folders = ", ".join(str(d.path) for d in self.datasets) or "no datasets"
            raise ConfigError(f"no {data_type} samples in {folders}")
        self.fingerprint = _fingerprint(data_type, self.shards, self._sizes)
        self.position = rank
        self._buffer: deque[tuple[int, RawSample, ShardRef]] = deque()
        self._epoch_cache: dict[int, tuple[list[int], list[int]]] = {}

    # -- iteration ------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Sample]:
        return self

    def __next__(self) -> Sample:
        if not self._buffer or self._buffer[0][0] != self.position:
            self._load_shard_of(self.position)
        g, raw, shard = self._buffer[0]
        sample = self._decode(raw, shard)
        self._buffer.popleft()  # only now: after a failure, state() still points at the bad sample
        self.position = g + self.world
        return sample

    def take(self, n: int) -> list[Sample]:
        return [next(self) for _ in range(n)]

    @property
    def epoch(self) -> int:
        """The epoch of the next sample."""
        return self.position // self.epoch_size

    def seek(self, position: int) -> None:
        """Continue with the first global position >= `position` that belongs to this rank."""
        if position < 0:
            raise ValueError(f"position must be >= 0, got {position}")
        self.position = position + (self.rank - position) % self.world
        while self._buffer and self._buffer[0][0] < self.position:
            self._buffer.popleft()
        if self._buffer and self._buffer[0][0] != self.position:
            self._buffer.clear()

    # -- state ----------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """JSON-serialisable: `position` is authoritative; epoch / shard_pos (index in the
        epoch's shard order) / sample_pos (index among the type's samples of that shard, in the
        epoch's order) / shard say the same for people."""
        epoch, shard_pos, sample_pos, k = self._locate(self.position)
        return {"data_type": self.data_type, "seed": self.seed, "rank": self.rank, "world": self.world,
                "fingerprint": self.fingerprint, "position": self.position, "epoch": epoch,
                "shard_pos": shard_pos, "sample_pos": sample_pos,
                "shard": f"{self.shards[k].path.parent.name}/{self.shards[k].path.name}"}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue exactly where the stream that saved `state` would have continued."""
        self._check_compatible(state, "stream state")
        if (state.get("rank"), state.get("world")) != (self.rank, self.world):
            raise ConfigError(f"{self.data_type} stream state was saved by rank {state.get('rank')} of "
                              f"{state.get('world')}, this stream is rank {self.rank} of {self.world}; "
                              "restore a Mixture state to change the world size")
        position = state.get("position")
        if not isinstance(position, int) or position < 0 or position % self.world != self.rank:
            raise ConfigError(f"{self.data_type} stream state has an invalid position {position!r}")
        self._buffer.clear()
        self.position = position

    def _check_compatible(self, state: Mapping[str, Any], what: str) -> None:
        if state.get("data_type", self.data_type) != self.data_type:
            raise ConfigError(f"{what} is for data type {state.get('data_type')!r}, not {self.data_type!r}")
        if state.get("seed") != self.seed:
            raise ConfigError(f"{what} of {self.data_type} was saved with seed {state.get('seed')!r}, "
                              f"this run uses seed {self.seed}; resume with the same seed")
        if state.get("fingerprint") != self.fingerprint:
            raise ConfigError(f"the {self.data_type} data changed since the {what} was saved (other shards, or "
                              f"other sample counts, under {', '.join(str(d.path) for d in self.datasets)}); "
                              "resume with the data the run started with")

    # -- internals ------------------------------------------------------------------------------

    def _epoch_order(self, epoch: int) -> tuple[list[int], list[int]]:
        """The epoch's shard order (canonical indices) and each shard's first position in it."""
        cached = self._epoch_cache.get(epoch)
        if cached is None:
            order = permutation(len(self.shards), _seed(self.seed, self.data_type, epoch, "shards"))
            starts, total = [], 0
            for k in order:
                starts.append(total)
                total += self._sizes[k]
            cached = (order, starts)
            self._epoch_cache = {epoch: cached}  # one epoch at a time: O(shards) memory
        return cached

    def _locate(self, position: int) -> tuple[int, int, int, int]:
        """(epoch, index in the epoch's shard order, index within that shard, canonical shard)."""
        epoch, offset = divmod(position, self.epoch_size)
        order, starts = self._epoch_order(epoch)
        shard_pos = bisect.bisect_right(starts, offset) - 1
        return epoch, shard_pos, offset - starts[shard_pos], order[shard_pos]

    def _load_shard_of(self, position: int) -> None:
        """Buffer this rank's samples of the shard holding `position`, from `position` on."""
        epoch, _, sample_pos, k = self._locate(position)
        shard = self.shards[k]
        keys = self._keys_of_type(shard)
        perm = permutation(len(keys), _seed(self.seed, self.data_type, epoch, "samples", k))
        base = position - sample_pos  # global position of the shard's first sample this epoch
        wanted = {keys[perm[j]]: base + j for j in range(sample_pos, len(keys))
                  if (base + j) % self.world == self.rank}
        found: dict[str, RawSample] = {}
        shard_problems = []
        with contextlib.closing(iter_raw_samples(shard.path)) as raws:
            for raw in raws:
                shard_problems += [p for p in raw.problems if p.rule == "shard_truncated"]
                if raw.key not in wanted:
                    continue  # another type's or another rank's sample, or one already read: not kept
                if raw.key in found:  # make the sample fail loudly when decoded
                    found[raw.key].problems.append(Problem("key_duplicate", f"key {raw.key!r} appears twice"))
                    continue
                found[raw.key] = raw
        missing = [key for key in wanted if key not in found]
        if missing:
            why = f" ({shard_problems[0]})" if shard_problems else ""
            raise SampleProblem("sample_missing", f"{shard.path} key {missing[0]!r}: listed in manifest "
                                f"{shard.manifest.name} but not in the shard{why}")
        self._buffer = deque(sorted(((g, found[key], shard) for key, g in wanted.items()), key=lambda e: e[0]))

    def _keys_of_type(self, shard: ShardRef) -> list[str]:
        """Keys of this type's samples in the shard, in manifest (= tar) order."""
        table = _read_manifest(shard.manifest, ["key", "kind", "n_frames"])
        keys = [key for key, kind, n in zip(table.column("key").to_pylist(), table.column("kind").to_pylist(),
                                            table.column("n_frames").to_pylist())
                if _row_type(kind, bool(n), shard.manifest) == self.data_type]
        if len(keys) != shard.counts[self.data_type]:
            raise DatasetError(f"{shard.manifest} now lists {len(keys)} {self.data_type} samples, "
                               f"{shard.counts[self.data_type]} when the data was discovered; "
                               "the dataset changed during training")
        return keys

    def _decode(self, raw: RawSample, shard: ShardRef) -> Sample:
        try:
            sample = decode_sample(raw)
        except SampleProblem as exc:
            raise SampleProblem(exc.problem.rule, f"{shard.path} key {raw.key!r}: {exc.problem.message}") from None
        actual = data_type_of(sample)
        if actual != self.data_type:
            raise SampleProblem("data_type_mismatch", f"{shard.path} key {raw.key!r}: manifest {shard.manifest.name} "
                                f"says {self.data_type}, the record is {actual}")
        return sample


def _fingerprint(data_type: str, shards: list[ShardRef], sizes: list[int]) -> str:
    """Identifies the stream's data by content (shard sha256 and counts), not by path, so a run
    restored on another machine with the same data resumes, and one with other data refuses to."""
    parts = [data_type, [[s.sha256 or s.path.name, n] for s, n in zip(shards, sizes)]]
    return hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode("utf-8")).hexdigest()[:16]


def _check_rank(rank: int, world: int) -> None:
    if not isinstance(world, int) or world < 1:
        raise ConfigError(f"world size must be an integer >= 1, got {world!r}")
    if not isinstance(rank, int) or not 0 <= rank < world:
        raise ConfigError(f"rank must be an integer in [0, {world - 1}], got {rank!r}")


# ---------------------------------------------------------------------------------------------
# The per-step mixture


def rank_share(batch_size: int, start: int, rank: int, world: int) -> int:
    """How many of the global positions [start, start + batch_size) are rank's (g % world == rank).
    Summed over ranks this is batch_size; shares differ by at most one."""
    offset = (rank - start) % world
    return 0 if offset >= batch_size else (batch_size - offset - 1) // world + 1


class Mixture:
    """Per step, this rank's share of every data type's global batch (see module doc).

    Types are taken in DATA_TYPES order; types with batch size 0 are ignored. Streams must be
    fresh (use `restore` to resume) and built for the same rank and world.
    """

    def __init__(self, streams: Mapping[str, TypeStream], batch_sizes: Mapping[str, int], rank: int = 0,
                 world: int = 1):
        _check_rank(rank, world)
        _check_batch_sizes(batch_sizes)
        self.rank, self.world = rank, world
        self.batch_sizes = {t: int(batch_sizes[t]) for t in DATA_TYPES if batch_sizes.get(t, 0) > 0}
        self.types = tuple(self.batch_sizes)
        missing = [t for t in self.types if t not in streams]
        if missing:
            raise ConfigError(f"no stream for data type(s) {', '.join(missing)} with batch size > 0")
        self.streams = {t: streams[t] for t in self.types}
        for t, stream in self.streams.items():
            if (stream.data_type, stream.rank, stream.world) != (t, rank, world):
                raise ConfigError(f"stream given for {t} reads {stream.data_type} as rank {stream.rank} of "
                                  f"{stream.world}; the mixture is rank {rank} of {world}")
            if stream.position != rank:
                raise ConfigError(f"the {t} stream was already read from; give fresh streams and resume "
                                  "with Mixture.restore")
        self.step = 0
        self._window = {t: 0 for t in self.types}  # global position of the next step's first sample

    def shares(self) -> dict[str, int]:
        """This rank's number of samples of each type in the next batch."""
        return {t: rank_share(b, self._window[t], self.rank, self.world) for t, b in self.batch_sizes.items()}

    def next_batch(self) -> list[Sample]:
        """This rank's samples for the next step, grouped by type in DATA_TYPES order."""
        batch: list[Sample] = []
        for t, n in self.shares().items():
            batch += self.streams[t].take(n)
        for t, b in self.batch_sizes.items():
            self._window[t] += b
            self.streams[t].seek(self._window[t])  # a no-op unless this rank's share was 0
        self.step += 1
        return batch

    def advance(self, steps: int = 1) -> None:
        """Skip `steps` steps without reading them: only the positions move (emu.train.loader)."""
        for t, b in self.batch_sizes.items():
            self._window[t] += b * steps
            self.streams[t].seek(self._window[t])
        self.step += steps

    def epochs(self) -> dict[str, float]:
        """Epochs of each type read so far (by all ranks together), for logging."""
        return {t: self._window[t] / self.streams[t].epoch_size for t in self.types}

    def state(self) -> dict[str, Any]:
        """JSON-serialisable and the same on every rank: save it once (e.g. from rank 0)."""
        return {"version": STATE_VERSION, "step": self.step,
                "types": {t: {"position": self._window[t], "batch_size": self.batch_sizes[t],
                              "epoch": self._window[t] // self.streams[t].epoch_size,
                              "seed": self.streams[t].seed, "fingerprint": self.streams[t].fingerprint}
                          for t in self.types}}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue exactly after the step at which `state` was saved, for any rank and world size."""
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            raise ConfigError(f"data state version {state.get('version') if isinstance(state, Mapping) else None!r} "
                              f"is not {STATE_VERSION}")
        saved = state.get("types", {})
        if set(saved) != set(self.types):
            raise ConfigError(f"the data state holds types {', '.join(sorted(saved)) or 'none'}, this run reads "
                              f"{', '.join(self.types)} (batch size > 0); resume with the same data types")
        for t in self.types:
            self.streams[t]._check_compatible({"data_type": t, **saved[t]}, "data state")
            position = saved[t].get("position")
            if not isinstance(position, int) or position < 0:
                raise ConfigError(f"data state of {t} has an invalid position {position!r}")
        for t in self.types:
            self._window[t] = saved[t]["position"]
            self.streams[t].seek(self._window[t])
        self.step = int(state.get("step", 0))


def _check_batch_sizes(batch_sizes: Mapping[str, int]) -> None:
    unknown = [t for t in batch_sizes if t not in DATA_TYPES]
    if unknown:
        raise ConfigError(f"batch_sizes names unknown data type(s) {', '.join(map(repr, unknown))}; "
                          f"data types are: {', '.join(DATA_TYPES)}")
    for t, b in batch_sizes.items():
        if isinstance(b, bool) or not isinstance(b, int) or b < 0:
            raise ConfigError(f"batch_sizes.{t} must be an integer >= 0, got {b!r}")
    if not any(batch_sizes.values()):
        raise ConfigError("batch_sizes: at least one data type needs a batch size > 0")


def build_mixture(data_dirs: list[Path], batch_sizes: Mapping[str, int], seed: int, rank: int = 0,
                  world: int = 1) -> Mixture:
    """Discover the data and build this rank's Mixture. Raises ConfigError before any training
    when a type with batch size > 0 has no samples under `data_dirs`, or batch_sizes names an
    unknown type."""
    _check_batch_sizes(batch_sizes)
    _check_rank(rank, world)
    dirs = [Path(d) for d in data_dirs]
    if not dirs:
        raise ConfigError("no data folders given")
    found = discover(dirs)
    counts = sample_counts(found)
    present = ", ".join(f"{t} ({n} samples)" for t, n in counts.items()) or "none"
    for t in DATA_TYPES:
        if batch_sizes.get(t, 0) > 0 and not counts.get(t):
            raise ConfigError(f"batch_sizes.{t} = {batch_sizes[t]} but there are no {t} samples under "
                              f"{', '.join(map(str, dirs))}; data types present there: {present}. "
                              f"Add {t} data or set batch_sizes.{t} to 0")
    streams = {t: TypeStream(t, found[t], seed, rank, world) for t in DATA_TYPES if batch_sizes.get(t, 0) > 0}
    return Mixture(streams, batch_sizes, rank, world)
