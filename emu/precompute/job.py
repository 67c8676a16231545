"""The precompute stage: a Ray Data batch-inference job (the only Ray import of the platform).

    (dataset, shard) items ──flat_map──► one row per image: part, key, index, bytes, sha256,
                                         content addresses                     (CPU tasks)
      ──map_batches──► decode (PIL) + preprocess: pixels (+ center crop for latents)   (CPU tasks)
      ──map_batches(EncoderActor, ActorPoolStrategy)──► pooled embeddings per side
                                         (+ VAE latents)          (actors: the encoder loads once)
      ──iter_batches (in order)──► the driver writes one part per INPUT shard, atomically

Re-runs compute only what is missing (emu.precompute.content for addresses and layout):
  * a part is kept when its index is intact, was made under the current fingerprints (encoder
    weights, input size, sides, mean/std, dtype, latent settings) and the addresses of the shard's
    images as they are now equal the recorded ones (a digest; computed in Ray tasks, no encoder);
  * every other shard is recomputed whole: missing, deleted, stale, or left half-written by a
    crash (a part's index is its commit marker: deleted before its tensors change, written last);
  * `precompute.json` is removed when a run starts and written when it finishes, so a training
    stage never reads a precompute whose run did not finish.

The driver writes every file (outputs need no shared file system); workers read the shards and
the model, so on a Ray cluster they get sources every node reaches: the shards' objects in the
DVC remote and the model by md5 (emu.precompute.remote, emu.precompute.sources).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emu.config import save_resolved, to_dict
from emu.errors import ConfigError, DatasetError
from emu.precompute.config import PrecomputeConfig
from emu.precompute.content import (CONFIG_FILE, FORMAT, PART_FORMAT, SUMMARY_FILE, VERSION, Spec, addresses_digest,
                                    atomic_write, bytes_sha256, embedding_spec, fingerprint, iter_shard_images,
                                    latent_spec, part_paths, read_part_index, shard_digest)
from emu.precompute.encoder import Encoder, load_encoder
from emu.precompute.sources import local_shard

log = logging.getLogger(__name__)

#: Environment for a Ray started here: no usage stats, no token auth prompt (../shared/ENVIRONMENT.md).
RAY_ENVIRONMENT = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


@dataclass
class PrecomputeSummary:
    """What a run did. `computed` names the parts written by this run (`<dataset>/<shard-stem>`)."""

    out_dir: Path
    parts: int                  # output parts = input shards
    parts_computed: int
    parts_kept: int
    images: int                 # images (and video frames) covered by all parts
    images_computed: int        # encoded by this run
    seconds: float              # the whole run
    compute_seconds: float      # the streaming pass (actor start, read, encode, write)
    images_per_s: float         # images_computed / compute_seconds
    encoder_sha256: str
    computed: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return (f"precompute: {self.images} images in {self.parts} parts at {self.out_dir}; computed "
                f"{self.images_computed} images ({self.parts_computed} parts), kept {self.parts_kept} parts; "
                f"{self.images_per_s:.1f} images/s ({self.compute_seconds:.1f} s encoding, {self.seconds:.1f} s total)")


@dataclass
class _Part:
    id: int
    dataset: str
    shard: Path
    expected_images: int | None
    #: where workers read the shard: its path, or its object in the DVC remote
    source: str

    @property
    def name(self) -> str:
        return f"{self.dataset}/{self.shard.name.removesuffix('.tar')}"


@dataclass
class _Run:
    """Everything fixed for one run: the encoder's identity and the fingerprints."""

    model: str
    encoder: Encoder
    encoder_sha256: dict[str, str]
    sides: list[int]
    spec: Spec
    dtype: str
    latent: dict[str, Any] | None  # decoder path, vae hashes, latent_size, channels, scale factor


# ---- the stage ---------------------------------------------------------------------------------

def run_precompute(data: list[Path], model: str, out: Path, config: PrecomputeConfig,
                   shard_sources: Mapping[Path, str] | None = None,
                   on_part: Callable[[Path, Path], None] | None = None) -> PrecomputeSummary:
    """Encode every image of the datasets under `data` with the frozen encoder of `model` (a folder,
    an s3:// URI or an `md5:` reference, emu.precompute.sources) and write the parts under `out`.
    Re-running on the same `out` computes only the parts that are missing or stale (module
    docstring). `shard_sources` (shard path -> where workers read it): `data` holds the datasets'
    metadata only, and every shard is read from its source (an object of the DVC remote).
    `on_part(tensors, index)` is called after each part is committed (the driver of a RayJob
    uploads it then, emu.precompute.remote)."""
    started = time.perf_counter()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} exists and is not a folder")
    datasets = _datasets(data, require_shards=shard_sources is None)
    run = _prepare_run(model, config)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(config, "precompute", out / CONFIG_FILE)
    (out / SUMMARY_FILE).unlink(missing_ok=True)  # written last: absent until this run finishes
    sources = shard_sources or {}
    parts = [_Part(i, name, shard, _manifest_images(path, shard), str(sources.get(shard, shard)))
             for i, (name, path, shard) in enumerate((n, p, s) for n, p, shards in datasets for s in shards)]

    ray_temp = _start_ray(config)
    try:
        import ray

        gpus, actors = _resources(config, ray.cluster_resources())
        kept = _fresh_parts(parts, out, run.spec)
        todo = [p for p in parts if p.id not in kept]
        log.info("precompute: %d parts, %d up to date, %d to compute (%d actors, %g GPUs each)",
                 len(parts), len(kept), len(todo), actors, gpus)
        compute_started = time.perf_counter()
        written, images_computed = _compute(todo, out, run, config, actors, gpus, on_part) if todo else ({}, 0)
        compute_seconds = time.perf_counter() - compute_started
    finally:
        _stop_ray(ray_temp)

    images = sum(kept.values()) + sum(written.values())
    summary = PrecomputeSummary(
        out_dir=out, parts=len(parts), parts_computed=len(written), parts_kept=len(kept), images=images,
        images_computed=images_computed, seconds=time.perf_counter() - started, compute_seconds=compute_seconds,
        images_per_s=images_computed / compute_seconds if images_computed and compute_seconds > 0 else 0.0,
        encoder_sha256=run.encoder_sha256["float32"], computed=[p.name for p in parts if p.id in written])
    _write_summary(out, config, run, datasets, parts, summary)
    log.info(summary.describe())
    return summary


def _datasets(data: list[Path], require_shards: bool = True) -> list[tuple[str, Path, list[Path]]]:
    """(name, folder, shards) per dataset under `data` (a dataset, or a folder of datasets, as the
    training stages read them). Parts go to out/<name>/, so names must be unique."""
    from emu.train.data import discover

    refs = {}
    for group in discover([Path(d) for d in data], require_shards).values():
        for ref in group:
            refs.setdefault(ref.path.resolve(), ref)
    by_name: dict[str, Path] = {}
    found = []
    for ref in sorted(refs.values(), key=lambda r: str(r.path)):
        name = ref.path.name
        if name in by_name:
            raise ConfigError(f"datasets {by_name[name]} and {ref.path} share the folder name {name!r}; precompute "
                              f"writes out/{name}/, so precompute them into separate --out folders (or rename one)")
        by_name[name] = ref.path
        found.append((name, ref.path, [s.path for s in ref.shards]))
    return found


def _manifest_images(dataset: Path, shard: Path) -> int | None:
    """Images of a shard per its manifest (for the progress bar only); None when unreadable."""
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(dataset / (shard.name.removesuffix(".tar") + ".parquet"), columns=["n_images"])
        return int(sum(n or 0 for n in table.column("n_images").to_pylist()))
    except Exception:  # a progress total is a nicety; the shard itself is the truth
        return None


def _prepare_run(model: str, config: PrecomputeConfig) -> _Run:
    """Load the encoder here once (no LM) to hash its weights and check the settings against it."""
    encoder = load_encoder(model, config.image_size)
    mc = encoder.config
    sides = list(config.sides) or sorted({mc.image_tokens_side, mc.video_tokens_side})
    grid = mc.vision.grid
    for side in sides:
        if mc.connector == "pool" and grid % side:
            raise ConfigError(f"precompute.sides: side {side} does not divide the patch grid side {grid} "
                              f"(image_size {mc.vision.image_size} / patch_size {mc.vision.patch_size})")
    hashes = encoder.weights_sha256()
    v = mc.vision
    embedding = {s: fingerprint(embedding_spec(hashes["float32"], mc.connector, v.image_size, s, v.mean, v.std,
                                               config.dtype)) for s in sides}
    crop, latent_fp, latent = {}, "", None
    if config.latents:
        from emu.precompute.encoder import load_vae, vae_sha256

        decoder = load_vae(config.decoder)
        size = config.latent_size or decoder.config.image_size
        if size % decoder.vae_scale_factor:
            raise ConfigError(f"precompute.latent_size ({size}) must be a multiple of the VAE's downsampling "
                              f"factor ({decoder.vae_scale_factor})")
        vae_hashes = vae_sha256(decoder)
        scale = float(decoder.vae.config.scaling_factor)
        latent_fp = fingerprint(latent_spec(vae_hashes["float32"], size, scale, config.dtype))
        crop = {s: fingerprint(embedding_spec(hashes["float32"], mc.connector, v.image_size, s, v.mean, v.std,
                                              config.dtype, crop_size=size)) for s in sides}
        latent = {"decoder": str(config.decoder), "vae_sha256": vae_hashes, "latent_size": size,
                  "latent_channels": decoder.config.latent_channels, "scaling_factor": scale,
                  "latent_side": size // decoder.vae_scale_factor}
        del decoder
    return _Run(model=str(model), encoder=encoder, encoder_sha256=hashes, sides=sides,
                spec=Spec(embedding=embedding, crop=crop, latent=latent_fp), dtype=config.dtype, latent=latent)


# ---- Ray ---------------------------------------------------------------------------------------

def _start_ray(config: PrecomputeConfig) -> str | None:
    """Start (or join: precompute.ray_address, else $RAY_ADDRESS) Ray unless this process already
    has; returns the temp dir of a local Ray started here (removed by _stop_ray), "" when joined a
    cluster, None when Ray was up."""
    import ray

    if ray.is_initialized():
        return None
    for name, value in RAY_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    # RAY_ADDRESS: how `ray job submit` (a RayJob's submitter) tells its driver the cluster.
    address = config.ray_address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return ""
    # Ray's own temp (sockets, logs, spilled objects); in the system temp dir because Unix socket
    # paths are limited to ~107 characters, which a path inside a deep `out` can exceed.
    temp = tempfile.mkdtemp(prefix="emu-ray-")
    ray.init(include_dashboard=False, _temp_dir=temp, logging_level=logging.WARNING)
    return temp


def _stop_ray(temp: str | None) -> None:
    if temp is None:
        return
    import ray

    ray.shutdown()
    if temp:
        shutil.rmtree(temp, ignore_errors=True)


def _resources(config: PrecomputeConfig, cluster: dict[str, float]) -> tuple[float, int]:
    """(GPUs per actor, actors), resolving the automatic settings against the cluster."""
    gpus_total, cpus_total = float(cluster.get("GPU", 0)), float(cluster.get("CPU", 0))
    gpus = config.gpus_per_actor if config.gpus_per_actor >= 0 else (1.0 if gpus_total else 0.0)
    if gpus > gpus_total:
        raise ConfigError(f"precompute.gpus_per_actor ({gpus:g}) exceeds the Ray cluster's {gpus_total:g} GPUs")
    if config.actors:
        actors = config.actors
    elif gpus:
        actors = max(1, int(gpus_total // gpus))
    else:
        actors = max(1, int((cpus_total - 1) // config.cpus_per_actor))
    if actors * config.cpus_per_actor >= cpus_total:
        raise ConfigError(f"precompute.actors ({actors}) x precompute.cpus_per_actor ({config.cpus_per_actor:g}) "
                          f"takes all {cpus_total:g} CPUs of the Ray cluster; at least one must stay free to read "
                          "and decode the shards")
    return gpus, actors


@contextlib.contextmanager
def _data_context():
    """Ray Data settings of this job, restored afterwards (the context is process-global):
    rows in order, so the rows of one shard arrive together and a part is written as soon as it
    is complete (the driver holds one shard's embeddings at a time); our progress bar instead of
    Ray's, and Ray Data's per-execution log lines at WARNING."""
    import ray

    context = ray.data.DataContext.get_current()
    saved = (context.execution_options.preserve_order, context.enable_progress_bars)
    data_log = logging.getLogger("ray.data")
    level = data_log.level
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    data_log.setLevel(max(level, logging.WARNING))
    try:
        yield context
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = saved
        data_log.setLevel(level)


def _fresh_parts(parts: list[_Part], out: Path, spec: Spec) -> dict[int, int]:
    """id -> images of each part that is up to date. Parts made under other fingerprints (or
    missing, or broken) are stale without reading their shard; the others are checked by
    re-hashing their shard's images in parallel Ray tasks (no encoder involved)."""
    import ray

    wanted = spec.to_json()
    candidates = {}
    for part in parts:
        index = read_part_index(part_paths(out, part.dataset, part.shard.name)[1])
        if index and index.get("fingerprints") == wanted and index.get("shard") == part.shard.name:
            candidates[part.id] = index
    if not candidates:
        return {}
    items = [{"part": pid, "shard": parts[pid].source} for pid in candidates]
    with _data_context():
        checked = ray.data.from_items(items, override_num_blocks=len(items)).map(
            _digest_item, fn_kwargs={"spec": wanted}).take_all()
    return {int(r["part"]): int(r["images"]) for r in checked
            if r["digest"] and r["digest"] == candidates[int(r["part"])].get("addresses_sha256")}


def _digest_item(item: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    with local_shard(item["shard"]) as shard:
        digest, images, _ = shard_digest(shard, Spec.from_json(spec))
    return {"part": item["part"], "digest": digest, "images": images}


def _expand(item: dict[str, Any], spec: dict[str, Any]):
    """One row per image of the shard, with its content addresses (JSON)."""
    addressing = Spec.from_json(spec)
    with local_shard(item["shard"]) as shard:
        for row in iter_shard_images(shard):
            sha = bytes_sha256(row.data) if not row.problem else ""
            yield {"part": item["part"], "key": row.key, "index": row.index, "image": row.data, "image_sha256": sha,
                   "addresses": json.dumps(addressing.addresses(sha)) if sha else "{}", "problem": row.problem}


def _decode(batch: dict[str, np.ndarray], vision: dict[str, Any], latent_size: int) -> dict[str, np.ndarray]:
    """PIL decode + the encoder's preprocessing (and the center crop for latents), per image; an
    image that does not decode becomes a problem row (zero pixels, never encoded)."""
    from PIL import Image

    from emu.model.config import VisionConfig
    from emu.model.vision import preprocess
    from emu.precompute.encoder import center_crop, unit_range

    config = VisionConfig(**vision)
    n, size = len(batch["key"]), config.image_size
    problems = [str(p) for p in batch["problem"]]
    pixels = np.zeros((n, 3, size, size), np.float32)
    if latent_size:
        crops = np.zeros((n, 3, size, size), np.float32)
        vae_pixels = np.zeros((n, 3, latent_size, latent_size), np.float32)
        time_ids = np.zeros((n, 6), np.float32)
    for i in range(n):
        if problems[i]:
            continue
        data = bytes(batch["image"][i])
        try:
            pixels[i] = preprocess([Image.open(io.BytesIO(data))], config)[0].numpy()
            if latent_size:
                crop, ids = center_crop(data, latent_size)
                crops[i] = preprocess([crop], config)[0].numpy()
                vae_pixels[i] = unit_range([crop])[0].numpy()
                time_ids[i] = ids
        except Exception as exc:  # PIL raises many types for a broken image; report it per image
            problems[i] = f"image_undecodable: image {int(batch['index'][i])}: {type(exc).__name__}: {exc}"
    result = {k: batch[k] for k in ("part", "key", "index", "image_sha256", "addresses")}
    result["problem"] = np.array(problems, dtype=object)
    result["pixels"] = pixels
    if latent_size:
        result.update(crop_pixels=crops, vae_pixels=vae_pixels, time_ids=time_ids)
    return result


class EncoderActor:
    """Loads the frozen encoder (and VAE) once per actor; encodes batches of preprocessed pixels."""

    def __init__(self, model: str, image_size: int, sides: list[int], encoder_sha256: str,
                 decoder: str = "", vae_sha256: str = ""):
        from emu.precompute.content import module_sha256

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.sides = sides
        self.encoder = load_encoder(model, image_size)
        if module_sha256(self.encoder.modules(), torch.float32) != encoder_sha256:
            raise ConfigError(f"the encoder weights of {model} changed while precompute ran; re-run it")
        self.encoder.to(self.device)
        self.decoder = None
        if decoder:
            from emu.precompute.encoder import load_vae

            self.decoder = load_vae(decoder)
            if module_sha256({"vae": self.decoder.vae}, torch.float32) != vae_sha256:
                raise ConfigError(f"the VAE weights of {decoder} changed while precompute ran; re-run it")
            self.decoder.to(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.array([not p for p in batch["problem"]], dtype=bool)
        rows = np.flatnonzero(ok)
        n = len(ok)
        out = {k: v for k, v in batch.items() if k not in ("pixels", "crop_pixels", "vae_pixels")}
        config = self.encoder.config
        width = config.visual_dim

        def embed(column: str, prefix: str) -> None:
            encoded = (self.encoder.encode(torch.from_numpy(batch[column][rows]).to(self.device), self.sides)
                       if len(rows) else {})
            for side in self.sides:
                array = np.zeros((n, config.tokens_per_image(side), width), np.float32)
                if len(rows):
                    array[rows] = encoded[side].float().cpu().numpy()
                out[f"{prefix}_{side}"] = array

        embed("pixels", "emb")
        if self.decoder is not None:
            embed("crop_pixels", "crop")
            pixels = batch["vae_pixels"]
            side = pixels.shape[-1] // self.decoder.vae_scale_factor
            latents = np.zeros((n, self.decoder.config.latent_channels, side, side), np.float32)
            if len(rows):
                with torch.inference_mode():
                    encoded = self.decoder.encode_latents(torch.from_numpy(pixels[rows]).to(self.device), sample=False)
                latents[rows] = encoded.float().cpu().numpy()
            out["latent"] = latents
        return out


def _compute(todo: list[_Part], out: Path, run: _Run, config: PrecomputeConfig, actors: int,
             gpus: float, on_part: Callable[[Path, Path], None] | None) -> tuple[dict[int, int], int]:
    """Stream the stale shards through the actor pool; write their parts. Returns (id -> images
    of each part written, images encoded). Raises DatasetError for undecodable samples or images,
    after writing every part that had none (nothing already computed is lost)."""
    import dataclasses

    import ray
    from tqdm import tqdm

    latent_size = run.latent["latent_size"] if run.latent else 0
    with _data_context():
        items = [{"part": p.id, "shard": p.source} for p in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.flat_map(_expand, fn_kwargs={"spec": run.spec.to_json()})
        ds = ds.map_batches(_decode, batch_size=config.batch_size, batch_format="numpy",
                            fn_kwargs={"vision": dataclasses.asdict(run.encoder.config.vision),
                                       "latent_size": latent_size})
        # On CPU Ray fuses the decode into the actors (same resources: one process per core is
        # the better use of few cores); with GPUs the resources differ and decoding stays in CPU
        # tasks, off the GPU actors.
        ds = ds.map_batches(
            EncoderActor, batch_size=config.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=gpus, num_cpus=config.cpus_per_actor,
            fn_constructor_kwargs={"model": run.model, "image_size": run.encoder.config.vision.image_size,
                                   "sides": run.sides, "encoder_sha256": run.encoder_sha256["float32"],
                                   "decoder": run.latent["decoder"] if run.latent else "",
                                   "vae_sha256": run.latent["vae_sha256"]["float32"] if run.latent else ""})
        expected = [p.expected_images for p in todo]
        total = None if any(n is None for n in expected) else sum(expected)
        writer = _PartWriter(out, {p.id: p for p in todo}, run, on_part)
        with tqdm(total=total, unit="img", desc="precompute", disable=None, mininterval=1.0) as bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                writer.add(batch)
                bar.update(len(batch["key"]))
        writer.finish()
    if writer.problems:
        lines = [f"{name} key {key!r}: {problem}" for name, key, problem in writer.problems[:10]]
        more = len(writer.problems) - len(lines)
        raise DatasetError(f"{len(writer.problems)} samples or images could not be decoded"
                           f"{f' (first {len(lines)} shown)' if more else ''}; their shards were not precomputed "
                           f"({len(writer.written)} other parts were written and are kept):\n  " + "\n  ".join(lines))
    return writer.written, writer.images


class _PartWriter:
    """Collects the (in-order) rows of one part at a time and writes it when complete."""

    def __init__(self, out: Path, parts: dict[int, _Part], run: _Run,
                 on_part: Callable[[Path, Path], None] | None = None):
        self.out, self.parts, self.run, self.on_part = out, parts, run, on_part
        self.dtype = getattr(torch, run.dtype)
        self.current: int | None = None
        self.rows: list[dict[str, Any]] = []
        self.tensors: dict[str, torch.Tensor] = {}
        self.part_problems: list[tuple[str, str]] = []
        self.problems: list[tuple[str, str, str]] = []
        self.written: dict[int, int] = {}
        self.seen: set[int] = set()
        self.images = 0

    def add(self, batch: dict[str, np.ndarray]) -> None:
        for i in range(len(batch["key"])):
            part = int(batch["part"][i])
            if part != self.current:
                self._flush()
                if part in self.seen:  # preserve_order delivers a shard's rows together
                    raise RuntimeError(f"rows of {self.parts[part].name} arrived out of order")
                self.current = part
            key, index = str(batch["key"][i]), int(batch["index"][i])
            if batch["problem"][i]:
                self.part_problems.append((key, str(batch["problem"][i])))
                continue
            addresses = json.loads(batch["addresses"][i])
            row: dict[str, Any] = {"key": key, "index": index, "image_sha256": str(batch["image_sha256"][i]),
                                   **addresses}
            for side, addr in addresses["embedding"].items():
                self._keep(addr, batch[f"emb_{side}"][i])
            for side, addr in addresses.get("crop", {}).items():
                self._keep(addr, batch[f"crop_{side}"][i])
            if "latent" in addresses:
                self._keep(addresses["latent"], batch["latent"][i])
                row["time_ids"] = [float(v) for v in batch["time_ids"][i]]
            self.rows.append(row)
            self.images += 1

    def _keep(self, addr: str, array: np.ndarray) -> None:
        if addr not in self.tensors:  # identical images (repeated frames) share one tensor
            self.tensors[addr] = torch.tensor(array).to(self.dtype).contiguous()

    def finish(self) -> None:
        self._flush()
        for pid in self.parts:  # shards without a single image (text-only data) still get a part
            if pid not in self.seen:
                self.current = pid
                self._flush()

    def _flush(self) -> None:
        if self.current is None:
            return
        part = self.parts[self.current]
        self.seen.add(part.id)
        if self.part_problems:
            self.problems += [(part.name, key, problem) for key, problem in self.part_problems]
        else:
            self._write(part)
            self.written[part.id] = len(self.rows)
        self.current, self.rows, self.tensors, self.part_problems = None, [], {}, []

    def _write(self, part: _Part) -> None:
        from safetensors.torch import save_file

        tensors_path, index_path = part_paths(self.out, part.dataset, part.shard.name)
        tensors_path.parent.mkdir(parents=True, exist_ok=True)
        index_path.unlink(missing_ok=True)  # the commit marker goes first: no index while tensors change
        tmp = tensors_path.with_name(tensors_path.name + ".tmp")
        # One metadata key: safetensors writes metadata from a hash map, so with two keys their
        # order, hence the file's bytes, changed from run to run (the index names the shard).
        save_file(self.tensors, str(tmp), metadata={"format": PART_FORMAT})
        os.replace(tmp, tensors_path)
        digest = addresses_digest((r["key"], r["index"], {k: r[k] for k in ("embedding", "crop", "latent") if k in r})
                                  for r in self.rows)
        index = {"format": PART_FORMAT, "version": VERSION, "dataset": part.dataset, "shard": part.shard.name,
                 "tensors": tensors_path.name, "tensors_bytes": tensors_path.stat().st_size,
                 "dtype": self.run.dtype, "fingerprints": self.run.spec.to_json(), "addresses_sha256": digest,
                 "images": len(self.rows), "rows": self.rows}
        atomic_write(index_path, json.dumps(index, separators=(",", ":")).encode("utf-8"))
        if self.on_part is not None:
            self.on_part(tensors_path, index_path)


def _write_summary(out: Path, config: PrecomputeConfig, run: _Run, datasets, parts: list[_Part],
                   summary: PrecomputeSummary) -> None:
    """precompute.json: what the folder holds, and nothing about the run that wrote it (no time,
    no input paths, no timings: those are in the returned summary), so that the same inputs give
    the same bytes and the folder's DVC md5 (the next tasks' cache key) does not change."""
    mc = run.encoder.config
    record = {
        "format": FORMAT, "version": VERSION,
        "encoder": {"sha256": run.encoder_sha256, "connector": mc.connector, "visual_dim": mc.visual_dim,
                    "image_size": mc.vision.image_size, "patch_size": mc.vision.patch_size,
                    "mean": list(mc.vision.mean), "std": list(mc.vision.std),
                    "tokens": {str(s): mc.tokens_per_image(s) for s in run.sides}},
        "sides": run.sides, "dtype": run.dtype,
        "fingerprints": run.spec.to_json(),
        "latents": run.latent,
        "config": to_dict(config),
        "datasets": [{"name": name, "parts": [part_paths(Path("."), name, s.name)[1].as_posix() for s in shards]}
                     for name, _path, shards in datasets],
        "counts": {"parts": summary.parts, "images": summary.images},
    }
    atomic_write(out / SUMMARY_FILE, json.dumps(record, indent=2).encode("utf-8"))
