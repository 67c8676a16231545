"""Reading a precompute back in training (no Ray here: training processes import this module).

    lookup = embedding_lookup("runs/precompute", model)     # checks compatibility first
    embeds_NnD = lookup(slots, "image")                      # what EmuModel.encode_images would give

A stored tensor is found by its content address (emu.precompute.content): sha256 of the slot's
image bytes combined with the fingerprint of the side it needs. So a lookup can only return the
embedding of exactly these bytes under exactly this encoder and preprocessing; keys and image
indices are used to explain a miss (a frame subsampled by `video_frames` has another index in the
sequence than in its shard, its bytes are the same).

Before any lookup the store refuses (ConfigError) a model whose encoder weights hash, input size,
mean/std, connector or width differ from the precompute's, or whose pooled sides were not stored.
Parts are read lazily: the address table on first use, tensors through memory-mapped safetensors.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from emu.errors import ConfigError
from emu.precompute.content import (Spec, address, bytes_sha256, dtype_name, module_sha256, read_part_index,
                                    read_summary)

#: Open part files kept at once (each is a memory map; thousands of parts need not all be open).
OPEN_PARTS = 32


class PrecomputedStore:
    """The output of one finished `emu precompute` run (its precompute.json and parts)."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.summary = read_summary(self.out_dir)
        self.spec = Spec.from_json(self.summary["fingerprints"])
        self.part_paths = [self.out_dir / rel for d in self.summary["datasets"] for rel in d["parts"]]
        self._indexes: dict[int, dict[str, Any]] = {}
        self._tables: dict[tuple[str, int], dict[str, int]] = {}
        self._time_ids: dict[str, list[float]] = {}
        self._open: OrderedDict[int, Any] = OrderedDict()

    @property
    def sides(self) -> list[int]:
        return [int(s) for s in self.summary["sides"]]

    @property
    def image_size(self) -> int:
        return int(self.summary["encoder"]["image_size"])

    @property
    def model(self) -> str:
        """The encoder, by content (precompute.json keeps no input path: its bytes must not depend
        on where the model was read from)."""
        hashes = self.summary["encoder"]["sha256"]
        digest = hashes.get("float32") or next(iter(hashes.values())) if isinstance(hashes, dict) else hashes
        return f"the encoder with sha256 {str(digest)[:16]}…"

    def describe(self) -> str:
        return (f"{self.out_dir} (encoder of {self.model}, {self.image_size} px, sides {self.sides}, "
                f"{self.summary['counts']['images']} images)")

    # ---- compatibility ---------------------------------------------------------------------

    def check_encoder(self, model, sides: Iterable[int]) -> None:
        """Raise ConfigError unless `model` (an EmuModel, as a stage holds it) encodes images exactly
        as the precompute did, and every side in `sides` was stored."""
        enc = self.summary["encoder"]
        vision = model.visual.config  # what online encoding preprocesses with (LMStep.pixels)
        rerun = f"re-run `emu precompute --model <this model> --out {self.out_dir}` with matching settings"
        if vision.image_size != enc["image_size"]:
            raise ConfigError(f"{self.out_dir} was precomputed at {enc['image_size']} px but the model reads "
                              f"{vision.image_size} px images (the stage's image_size); {rerun} "
                              f"(precompute.image_size={vision.image_size})")
        if [float(v) for v in vision.mean] != enc["mean"] or [float(v) for v in vision.std] != enc["std"]:
            raise ConfigError(f"{self.out_dir} was precomputed with mean/std {enc['mean']}/{enc['std']} but the model "
                              f"normalises with {list(vision.mean)}/{list(vision.std)}; {rerun}")
        if model.config.connector != enc["connector"] or model.config.visual_dim != enc["visual_dim"]:
            raise ConfigError(f"{self.out_dir} holds {enc['visual_dim']}-wide {enc['connector']} embeddings but the "
                              f"model makes {model.config.visual_dim}-wide {model.config.connector} ones; {rerun}")
        missing = sorted(set(sides) - set(self.sides))
        if missing:
            raise ConfigError(f"{self.out_dir} holds pooled sides {self.sides} but the model needs side(s) {missing} "
                              f"(model image_tokens_side / video_tokens_side); {rerun} "
                              f"(precompute.sides={sorted(set(self.sides) | set(missing))})")
        self._check_weights(model, enc["sha256"], rerun)

    def _check_weights(self, model, recorded: dict[str, str], rerun: str) -> None:
        dtype = next(model.visual.parameters()).dtype
        name = dtype_name(dtype)
        if name not in recorded:
            raise ConfigError(f"the model's encoder is in {name}; {self.out_dir} records weight hashes for "
                              f"{', '.join(recorded)} only (train in fp32 or bf16)")
        have = module_sha256({"visual": model.visual, "cformer": model.cformer}, dtype)
        if have != recorded[name]:
            raise ConfigError(f"{self.out_dir} was precomputed with a different encoder: its weights ({name}) hash "
                              f"{recorded[name][:16]}… (model {self.model}), this model's encoder hashes "
                              f"{have[:16]}…; its embeddings are not this encoder's. {rerun}")

    # ---- lookups ---------------------------------------------------------------------------

    def embeddings(self, images: Sequence[tuple[str, int, bytes]], side: int, kind: str = "embedding") -> torch.Tensor:
        """(N, n, D) embeddings of (key, image index, image bytes) at pooled `side`, in the dtype
        stored (the encoder's); `kind` "crop" reads the center-crop embeddings stored with latents."""
        fingerprints = self.spec.embedding if kind == "embedding" else self.spec.crop
        if side not in fingerprints:
            raise ConfigError(f"{self.out_dir} holds no {kind} embeddings at side {side} (sides {sorted(fingerprints)})")
        return self._stack(images, kind, side, fingerprints[side])

    def latents(self, images: Sequence[tuple[str, int, bytes]]) -> tuple[torch.Tensor, torch.Tensor]:
        """((N, C, h, w) scaled VAE latents of the center crops, (N, 6) SDXL time ids)."""
        if not self.spec.latent:
            raise ConfigError(f"{self.out_dir} holds no latents; precompute with precompute.latents=true "
                              "precompute.decoder=<decoder folder>")
        latents = self._stack(images, "latent", 0, self.spec.latent).float()
        time_ids = [self._time_ids[address(bytes_sha256(data), self.spec.latent)] for _, _, data in images]
        return latents, torch.tensor(time_ids, dtype=torch.float32)

    def _stack(self, images: Sequence[tuple[str, int, bytes]], kind: str, side: int, fp: str) -> torch.Tensor:
        table = self._table(kind, side)
        tensors = []
        for key, index, data in images:
            addr = address(bytes_sha256(data), fp)
            part = table.get(addr)
            if part is None:
                raise self._missing(key, index, kind, side)
            tensors.append(self._handle(part).get_tensor(addr))
        return torch.stack(tensors)

    def _table(self, kind: str, side: int) -> dict[str, int]:
        """address -> part for one kind and side, built on first use from every part's index."""
        if (kind, side) not in self._tables:
            table: dict[str, int] = {}
            for pid in range(len(self.part_paths)):
                for row in self._index(pid)["rows"]:
                    if kind == "latent":
                        table[row["latent"]] = pid
                        self._time_ids[row["latent"]] = row["time_ids"]
                    else:
                        table[row[kind][str(side)]] = pid
            self._tables[(kind, side)] = table
        return self._tables[(kind, side)]

    def _index(self, pid: int) -> dict[str, Any]:
        if pid not in self._indexes:
            index = read_part_index(self.part_paths[pid])
            if index is None:
                raise ConfigError(f"precomputed part {self.part_paths[pid]} is missing or broken (it changed after "
                                  f"the precompute finished); re-run `emu precompute` with --out {self.out_dir}")
            self._indexes[pid] = index
        return self._indexes[pid]

    def _handle(self, pid: int):
        from safetensors import safe_open

        if pid in self._open:
            self._open.move_to_end(pid)
            return self._open[pid]
        index = self._index(pid)
        handle = safe_open(str(self.part_paths[pid].parent / index["tensors"]), framework="pt")
        self._open[pid] = handle
        if len(self._open) > OPEN_PARTS:
            self._open.popitem(last=False)
        return handle

    def _missing(self, key: str, index: int, kind: str, side: int) -> ConfigError:
        what = f"{kind} at side {side}" if kind != "latent" else "latent"
        for pid in range(len(self.part_paths)):
            part = self._index(pid)
            if any(row["key"] == key for row in part["rows"]):
                where = f"dataset {part['dataset']} shard {part['shard']}"
                if any(row["key"] == key and row["index"] == index for row in part["rows"]):
                    why = (f"{where} holds key {key!r} image {index}, but the image bytes differ from the "
                           "precomputed ones (the data changed after the precompute)")
                else:
                    why = f"{where} holds key {key!r} but not the image bytes of its image {index}"
                break
        else:
            names = ", ".join(d["name"] for d in self.summary["datasets"])
            why = f"no precomputed shard holds key {key!r} (datasets precomputed: {names or 'none'})"
        return ConfigError(f"no precomputed {what} for sample key {key!r} image {index} in {self.out_dir}: {why}; "
                           "re-run `emu precompute` over the data this stage trains on")


def embedding_lookup(precomputed_dir: str | Path, model) -> Callable[[list, str], torch.Tensor]:
    """The `embeddings` callable of LMStep: (VisualSlots, "image" | "frame") -> (N, n, D) as stored,
    images at model.config.image_tokens_side, frames at video_tokens_side. Raises ConfigError now
    when the precompute does not match the model (see PrecomputedStore.check_encoder)."""
    store = PrecomputedStore(precomputed_dir)
    sides = {"image": model.config.image_tokens_side, "frame": model.config.video_tokens_side}
    store.check_encoder(model, sides.values())

    def lookup(slots: list, kind: str) -> torch.Tensor:
        return store.embeddings([(s.key, s.index, s.data) for s in slots], sides[kind])

    lookup.store = store  # type: ignore[attr-defined]
    return lookup


def latent_lookup(precomputed_dir: str | Path, decoder, encoder=None, size: int | None = None):
    """For decoder training: (key, image index, bytes) items -> (latents (N, C, h, w), conditions
    (N, n, D) or None, time ids (N, 6)), all of the same center crop (an autoencoder's input and
    target are one image, Emu2 §2.2.3). Checks the VAE weights hash, the crop size (default the
    decoder's output size) and, with `encoder` (an EmuModel), its compatibility for the crop
    embeddings at its image_tokens_side."""
    store = PrecomputedStore(precomputed_dir)
    latents = store.summary.get("latents")
    if not latents:
        raise ConfigError(f"{store.out_dir} holds no latents; precompute with precompute.latents=true "
                          "precompute.decoder=<decoder folder>")
    size = size or decoder.config.image_size
    if latents["latent_size"] != size:
        raise ConfigError(f"{store.out_dir} holds latents of {latents['latent_size']} px crops but the decoder "
                          f"trains at {size} px; re-run `emu precompute` with precompute.latent_size={size}")
    dtype = next(decoder.vae.parameters()).dtype
    recorded = latents["vae_sha256"].get(dtype_name(dtype))
    if recorded != module_sha256({"vae": decoder.vae}, dtype):
        raise ConfigError(f"{store.out_dir} was precomputed with a different VAE (decoder {latents['decoder']}); "
                          "re-run `emu precompute` with this decoder")
    side = None
    if encoder is not None:
        side = encoder.config.image_tokens_side
        store.check_encoder(encoder, [side])

    def lookup(items: Sequence[tuple[str, int, bytes]]):
        values, time_ids = store.latents(items)
        conditions = store.embeddings(items, side, kind="crop").float() if side is not None else None
        return values, conditions, time_ids

    lookup.store = store  # type: ignore[attr-defined]
    return lookup
