"""The preset sections and the config class each one resolves to.

Loaders are functions so that listing sections imports nothing heavy (DESIGN.md convention 4).
A preset may only contain these sections; tests check every shipped preset against them.
"""

from __future__ import annotations

from collections.abc import Callable


def _synth() -> type:
    from emu.data.synth import SynthConfig
    return SynthConfig


def _import() -> type:
    from emu.data.formats import ImportConfig
    return ImportConfig


def _validate() -> type:
    from emu.validate import ValidateConfig
    return ValidateConfig


def _model() -> type:
    from emu.model.config import EmuConfig
    return EmuConfig


def _visual_decoder() -> type:
    from emu.model.config import DecoderConfig
    return DecoderConfig


def _precompute() -> type:
    from emu.precompute.config import PrecomputeConfig
    return PrecomputeConfig


def _evaluate() -> type:
    from emu.evaluate.harness import EvaluateConfig
    return EvaluateConfig


def _pipeline() -> type:
    from emu.pipeline.config import PipelineConfig
    return PipelineConfig


def _dashboard() -> type:
    from emu.dashboard.config import DashboardConfig
    return DashboardConfig


def _train(name: str) -> Callable[[], type]:
    def load() -> type:
        from emu.train import config
        return getattr(config, name)
    return load


SECTIONS: dict[str, Callable[[], type]] = {
    "synth": _synth,
    "import": _import,
    "validate": _validate,
    "model": _model,                  # the multimodal LM architecture (EmuConfig)
    "visual_decoder": _visual_decoder,  # the diffusion decoder architecture (DecoderConfig)
    "precompute": _precompute,        # frozen-encoder embeddings and VAE latents (Ray Data)
    "stage1": _train("Stage1Config"),
    "stage2": _train("Stage2Config"),
    "decoder": _train("DecoderTrainConfig"),
    "instruct": _train("InstructConfig"),      # Emu2-Chat (mode: chat)
    "instruct_gen": _train("InstructConfig"),  # Emu2-Gen (mode: gen)
    "evaluate": _evaluate,
    "pipeline": _pipeline,
    "dashboard": _dashboard,
}
