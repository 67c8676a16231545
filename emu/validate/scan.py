"""Scanning: find the datasets under a folder and turn every shard into per-sample manifest rows.

No Great Expectations here. Each shard is streamed with the safe reader (emu.data.shards), each
sample decoded once with its images fully decoded, and only the small facts of its manifest row
are kept: images are dropped after each sample and rows are written to parquet one shard at a
time, so memory stays flat however large the data. Samples that fail to decode still get a row
(`structure_error`), so the gate reports them like any other failure.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from emu.data import manifest
from emu.data.shards import (DATASET_FILE, SampleProblem, decode_sample, file_sha256, iter_raw_samples,
                             list_shards, read_index)
from emu.errors import DatasetError

log = logging.getLogger(__name__)

#: The gate's manifest: the per-shard manifest schema plus the dataset each row belongs to.
MANIFEST_SCHEMA = pa.schema([pa.field("dataset", pa.string()), *manifest.SCHEMA])
#: The `kind` reported for samples that could not be decoded.
UNDECODABLE = "undecodable"


@dataclass
class ShardCheck:
    """A shard listed in dataset.json: the sha256 recorded at import and the one read now."""

    dataset: str
    shard: str
    sha256_expected: str | None
    sha256_actual: str
    samples: int = 0


@dataclass
class DatasetScan:
    """What scanning one dataset found: its shards and how many samples of each kind."""

    name: str  # the folder relative to --data (its own name when --data is the dataset)
    path: Path
    shard_paths: list[Path]
    index: dict[str, Any]
    shards: list[ShardCheck] = field(default_factory=list)
    kinds: Counter[str] = field(default_factory=Counter)

    @property
    def samples(self) -> int:
        return sum(self.kinds.values())


def find_datasets(data: Path) -> list[Path]:
    """`data` itself when it holds dataset.json, else every dataset folder below it, sorted.

    Dataset folders are not searched further (their contents belong to them) and hidden folders
    (.dvc, .git) are skipped.
    """
    data = Path(data)
    if not data.is_dir():
        raise DatasetError(f"--data {data} is not a folder")
    if (data / DATASET_FILE).is_file():
        return [data]
    found = []
    for root, dirs, files in os.walk(data):
        if DATASET_FILE in files:
            found.append(Path(root))
            dirs.clear()
        else:
            dirs[:] = [d for d in dirs if not d.startswith(".")]
    if not found:
        raise DatasetError(f"no {DATASET_FILE} under {data}: nothing to validate "
                           f"(import data with `emu data import` first)")
    return sorted(found)


def plan_dataset(data: Path, dataset_dir: Path) -> DatasetScan:
    """Read a dataset's index and check its shards exist, before any long scan starts.

    Raises DatasetError for unusable input: unreadable dataset.json, a listed shard missing, or no
    shards at all.
    """
    name = dataset_dir.resolve().name if dataset_dir == data else dataset_dir.relative_to(data).as_posix()
    index = read_index(dataset_dir)
    shard_paths = list_shards(dataset_dir)
    if not shard_paths:
        raise DatasetError(f"{dataset_dir}/{DATASET_FILE} lists no shards: nothing to validate")
    return DatasetScan(name=name, path=dataset_dir, shard_paths=shard_paths, index=index)


def write_manifest(datasets: list[DatasetScan], path: Path, max_pixels: int) -> None:
    """Scan every shard of every dataset into one parquet manifest at `path`, one row group per
    shard; fills in each dataset's shard checks and kind counts."""
    with pq.ParquetWriter(path, MANIFEST_SCHEMA) as writer:
        for dataset in datasets:
            recorded = _recorded_sha256(dataset.index)
            for shard_path in dataset.shard_paths:
                rows = [{"dataset": dataset.name, **row} for row in shard_rows(shard_path, max_pixels)]
                writer.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA))
                dataset.kinds.update(row["kind"] or UNDECODABLE for row in rows)
                dataset.shards.append(ShardCheck(
                    dataset=dataset.name, shard=shard_path.name,
                    sha256_expected=recorded.get(shard_path.name),
                    sha256_actual=file_sha256(shard_path), samples=len(rows)))
            log.info("scanned %s: %d samples in %d shards", dataset.name, dataset.samples,
                     len(dataset.shards))


def shard_rows(shard_path: Path, max_pixels: int) -> Iterator[dict[str, Any]]:
    """One manifest row per sample of a shard, streamed: a sample's images live only while its
    row is computed."""
    for raw in iter_raw_samples(shard_path):
        try:
            sample = decode_sample(raw)
        except SampleProblem as exc:
            yield manifest.row_for_problem(raw.shard, raw.key, exc.problem.rule, exc.problem.message)
            continue
        yield manifest.row_for_sample(raw.shard, sample, max_pixels=max_pixels, decode_images=True)


def _recorded_sha256(index: dict[str, Any]) -> dict[str, str | None]:
    return {entry["name"]: entry.get("sha256") for entry in index.get("shards", [])}
