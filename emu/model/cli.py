"""`emu model ...`: check checkpoints before a run, and convert SDXL into a visual decoder.

A Typer sub-app registered by emu/cli.py. Importing it imports only typer: torch, transformers
and diffusers load when a command runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

__all__ = ["model_app"]

model_app = typer.Typer(help="Pretrained checkpoints: inspect them, convert SDXL into a visual decoder.",
                        no_args_is_help=True)


@model_app.command("inspect")
def inspect_command(
    path: Annotated[str, typer.Argument(help="Checkpoint folder or file, local or s3:// (an Emu model or decoder "
                                             "folder, a Hugging Face LM folder, an SDXL diffusers folder, an "
                                             "EVA-CLIP / Emu2 checkpoint file).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """What a checkpoint holds: format, parameter count and dtypes, architecture, tokenizer, and
    which settings it can initialise (model.lm.pretrained, model.vision.pretrained, decoder.init, ...)."""
    from emu.model.inspection import inspect_path

    report = inspect_path(path)
    typer.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.describe())


@model_app.command("convert-sdxl")
def convert_sdxl_command(
    src: Annotated[str, typer.Argument(help="SDXL-layout diffusers folder (unet/, vae/, scheduler/), local or s3://.")],
    out: Annotated[Path, typer.Option(help="Folder for the visual decoder (then decoder.init=OUT).")],
    visual_dim: Annotated[Optional[int], typer.Option(
        help="Width of the visual embeddings the cross-attention reads; default: the preset's "
             "visual_decoder.visual_dim (emu2-37b: 1792, EVA-02-CLIP-E's width).")] = None,
    preset: Annotated[str, typer.Option("--preset", help="Preset whose visual_decoder.visual_dim is the default.")] = "emu2-37b",
    seed: Annotated[int, typer.Option(help="Seed of the re-initialised weights.")] = 0,
) -> None:
    """Initialise the visual decoder from SDXL (Emu2 §2.2.3): keep every compatible UNet/VAE weight,
    re-initialise the cross-attention inputs and the text-time embedding's text columns, report both."""
    from emu.config import resolve
    from emu.model.config import DecoderConfig
    from emu.model.sdxl import convert_sdxl

    dim = visual_dim if visual_dim is not None else resolve(DecoderConfig, "visual_decoder", preset).visual_dim
    typer.echo(convert_sdxl(src, out, visual_dim=dim, seed=seed).describe())
