"""Content addressing and the on-disk format of a precompute (shared by the job and the store).

Output layout (`out/`):

    precompute.json                   written last, by a run that finished: settings, model path,
                                      encoder weights hashes, fingerprints, parts, counts, images/s
    precompute.config.yaml            the resolved `precompute` settings of the last run
    <dataset>/<shard-stem>.safetensors  one part per INPUT shard: tensors named by content address
    <dataset>/<shard-stem>.index.json   the part's index: (key, image index) -> content address per
                                      side (and crop/latent), the fingerprints, the addresses digest

Content address of one stored tensor = sha256(image bytes sha256 ":" fingerprint), where the
fingerprint is the sha256 of everything else that determines the tensor: the encoder weights hash,
connector, input size, pooled side, mean/std, resize filter, storage dtype (and for latents the VAE
weights hash, crop size, scaling factor). Identical images share one tensor; a changed image,
encoder or setting gives new addresses, so a stale tensor can never be read for a new input.

The encoder weights hash covers the state dicts of `visual` (and `cformer`) in a given dtype: the
job records it in float32 and in bfloat16 (DeepSpeed's bf16 mode casts the training model in
place), so the store can check the very model a stage trains.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from emu.errors import ConfigError

FORMAT = "emu-precompute"
PART_FORMAT = "emu-precompute-part"
VERSION = 1
SUMMARY_FILE = "precompute.json"
CONFIG_FILE = "precompute.config.yaml"
TENSORS_SUFFIX = ".safetensors"
INDEX_SUFFIX = ".index.json"
#: Weight-hash dtypes recorded by the job: the precisions a training stage runs in (RuntimeConfig).
HASH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: Resize filter of emu.model.vision.preprocess (part of every fingerprint: it changes the pixels).
RESIZE = "bicubic"


# ---- hashing -----------------------------------------------------------------------------------

def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def module_sha256(modules: Mapping[str, nn.Module | None], dtype: torch.dtype) -> str:
    """sha256 of the modules' state dicts (names, dtypes, shapes, bytes), floating tensors cast to
    `dtype`. Under ZeRO-3 the parameters are partitioned across ranks; they are gathered first
    (a collective: every rank must call this, as every rank builds its embedding lookup)."""
    present = {prefix: m for prefix, m in modules.items() if m is not None}
    params = [p for m in present.values() for p in m.parameters()]
    if any(hasattr(p, "ds_id") for p in params):
        # Only reached when DeepSpeed (emu.train.engine) has already partitioned these parameters,
        # so it is imported: GatheredParameters is the one way to read ZeRO-3 weights whole.
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return _state_sha256(present, dtype)
    return _state_sha256(present, dtype)


def _state_sha256(modules: Mapping[str, nn.Module], dtype: torch.dtype) -> str:
    digest = hashlib.sha256()
    for prefix in sorted(modules):
        for name, tensor in sorted(modules[prefix].state_dict().items()):
            t = tensor.detach()
            if t.is_floating_point():
                t = t.to(dtype)
            t = t.contiguous().cpu()
            digest.update(f"{prefix}.{name}|{dtype_name(t.dtype)}|{tuple(t.shape)}|".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def fingerprint(spec: Mapping[str, Any]) -> str:
    """sha256 of a canonical JSON of `spec` (sorted keys, no spaces)."""
    return bytes_sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode("utf-8"))


def address(image_sha256: str, fingerprint_sha256: str) -> str:
    """The content address of the tensor computed from an image under one fingerprint."""
    return bytes_sha256(f"{image_sha256}:{fingerprint_sha256}".encode("ascii"))


# ---- what a run computes -----------------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    """The fingerprints of one run: per stored side the image embeddings; with latents, the VAE
    latents of the center crop and the embeddings of that crop (per side)."""

    embedding: dict[int, str]
    crop: dict[int, str] = field(default_factory=dict)
    latent: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"embedding": {str(s): f for s, f in self.embedding.items()},
                "crop": {str(s): f for s, f in self.crop.items()}, "latent": self.latent}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Spec:
        return cls(embedding={int(s): f for s, f in data.get("embedding", {}).items()},
                   crop={int(s): f for s, f in data.get("crop", {}).items()}, latent=data.get("latent", ""))

    def addresses(self, image_sha256: str) -> dict[str, Any]:
        """Every address of one image: {"embedding": {"side": a}, "crop": {"side": a}, "latent": a}.
        Sides are strings, as after a JSON round trip, so digests agree however rows travelled."""
        out: dict[str, Any] = {"embedding": {str(s): address(image_sha256, f) for s, f in self.embedding.items()}}
        if self.crop:
            out["crop"] = {str(s): address(image_sha256, f) for s, f in self.crop.items()}
        if self.latent:
            out["latent"] = address(image_sha256, self.latent)
        return out


def embedding_spec(encoder_sha256: str, connector: str, image_size: int, side: int, mean, std, dtype: str,
                   crop_size: int = 0) -> dict[str, Any]:
    spec = {"what": "embedding", "version": VERSION, "encoder_sha256": encoder_sha256, "connector": connector,
            "image_size": image_size, "side": side, "mean": [float(v) for v in mean],
            "std": [float(v) for v in std], "resize": RESIZE, "dtype": dtype}
    if crop_size:
        spec.update(what="crop_embedding", crop="center", crop_size=crop_size)
    return spec


def latent_spec(vae_sha256: str, latent_size: int, scaling_factor: float, dtype: str) -> dict[str, Any]:
    return {"what": "latent", "version": VERSION, "vae_sha256": vae_sha256, "latent_size": latent_size,
            "crop": "center", "resize": RESIZE, "posterior": "mode", "scaling_factor": float(scaling_factor),
            "dtype": dtype}


def addresses_digest(rows: Iterable[tuple[str, int, Mapping[str, Any]]]) -> str:
    """One sha256 over the ordered (key, index, addresses) of a part: equal digests = the part
    holds exactly the tensors the current shard, encoder and settings call for."""
    digest = hashlib.sha256()
    for key, index, addrs in rows:
        digest.update(f"{key}|{index}|{json.dumps(addrs, sort_keys=True)}\n".encode("utf-8"))
    return digest.hexdigest()


# ---- the shard side ----------------------------------------------------------------------------

@dataclass
class ImageRow:
    """One image of an input shard (video frames are images: index = frame index)."""

    key: str
    index: int
    data: bytes
    problem: str = ""   # "rule: message" when the sample could not be decoded (no image then)


def iter_shard_images(tar_path: Path) -> Iterator[ImageRow]:
    """Every image of a shard in sample order, `index` = position in sample.images (what a
    VisualSlot's index means). A sample that does not decode yields one row naming its problem."""
    from emu.data.shards import SampleProblem, decode_sample, iter_raw_samples

    for raw in iter_raw_samples(Path(tar_path)):
        try:
            sample = decode_sample(raw)
        except SampleProblem as exc:
            yield ImageRow(key=raw.key, index=-1, data=b"", problem=str(exc.problem))
            continue
        for index, data in enumerate(sample.images):
            yield ImageRow(key=sample.key, index=index, data=data)


def shard_digest(tar_path: Path, spec: Spec) -> tuple[str, int, str]:
    """(addresses digest, images, first problem) of a shard as it is now, under `spec`."""
    rows = []
    for row in iter_shard_images(tar_path):
        if row.problem:
            return "", len(rows), f"key {row.key!r}: {row.problem}"
        rows.append((row.key, row.index, spec.addresses(bytes_sha256(row.data))))
    return addresses_digest(rows), len(rows), ""


# ---- part files --------------------------------------------------------------------------------

def part_paths(out_dir: Path, dataset: str, shard_name: str) -> tuple[Path, Path]:
    """(tensors file, index file) of the part of input shard `shard_name` of `dataset`."""
    stem = shard_name[: -len(".tar")] if shard_name.endswith(".tar") else shard_name
    folder = Path(out_dir) / dataset
    return folder / (stem + TENSORS_SUFFIX), folder / (stem + INDEX_SUFFIX)


def read_part_index(index_path: Path) -> dict[str, Any] | None:
    """The part's index, or None when it is missing, unreadable, of another format, or its tensors
    file is missing or not the size it recorded (a part is valid only as a whole)."""
    try:
        index = json.loads(Path(index_path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(index, dict) or index.get("format") != PART_FORMAT or index.get("version") != VERSION:
        return None
    tensors = Path(index_path).parent / str(index.get("tensors", ""))
    try:
        if tensors.stat().st_size != index.get("tensors_bytes"):
            return None
    except OSError:
        return None
    return index


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_summary(out_dir: Path) -> dict[str, Any]:
    """precompute.json of a finished run; ConfigError naming the folder otherwise."""
    path = Path(out_dir) / SUMMARY_FILE
    if not Path(out_dir).is_dir():
        raise ConfigError(f"precomputed folder {out_dir} does not exist; run `emu precompute` first")
    if not path.is_file():
        raise ConfigError(f"{out_dir} has no {SUMMARY_FILE}: not a precompute output, or its run did not finish "
                          "(re-run `emu precompute` with the same --out: it resumes)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        raise ConfigError(f"{path}: expected format {FORMAT!r} version {VERSION}")
    return data
