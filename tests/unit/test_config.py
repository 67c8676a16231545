"""The config system: presets, overrides, type checks, unknown keys, resolved config files."""

from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from emu.config import from_dict, load_preset, resolve, save_resolved, to_dict, valid_keys
from emu.errors import ConfigError
from emu.sections import SECTIONS


@dataclass
class Inner:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)


@dataclass
class Outer:
    name: str = "x"
    steps: int = 10
    flag: bool = False
    mode: Literal["a", "b"] = "a"
    maybe: int | None = None
    sizes: dict[str, int] = field(default_factory=lambda: {"pairs": 2})
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self):
        if self.steps < 1:
            raise ConfigError(f"outer.steps must be >= 1, got {self.steps}")


def test_overrides_are_typed_and_nested():
    cfg = resolve(Outer, "outer", None, ["steps=5", "flag=true", "inner.lr=3e-5", "inner.betas=[0.9, 0.98]",
                                         "sizes.videos=4", "maybe=null", "name=007", "mode=b"])
    assert cfg.steps == 5 and cfg.flag is True and cfg.mode == "b"
    assert cfg.inner.lr == pytest.approx(3e-5) and cfg.inner.betas == (0.9, 0.98)
    assert cfg.sizes == {"pairs": 2, "videos": 4}, "one entry changes; the default entries stay"
    assert cfg.name == "007", "str fields keep the override text verbatim (no YAML octal/int parsing)"
    assert cfg.maybe is None


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        resolve(Outer, "outer", None, ["stepz=3"])
    message = str(err.value)
    assert "outer.stepz" in message and "steps" in message and "inner" in message
    with pytest.raises(ConfigError, match=r"outer\.inner\.lrr.*valid settings of outer\.inner: betas, lr"):
        resolve(Outer, "outer", None, ["inner.lrr=1"])


@pytest.mark.parametrize("override, fragment", [
    ("steps=abc", "expected an integer"),
    ("steps=1.5", "expected an integer"),
    ("flag=yes please", "expected true or false"),
    ("mode=c", "one of 'a', 'b'"),
    ("inner.lr=fast", "expected a finite number"),
    ("inner.lr=.nan", "expected a finite number"),
    ("inner.lr=inf", "expected a finite number"),
    ("sizes.pairs=abc", "setting 'outer.sizes.pairs' in override 'sizes.pairs=abc': expected an integer"),
    ("steps", "key=value"),
    ("steps=0", "outer.steps must be >= 1"),
])
def test_bad_values_name_the_setting(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        resolve(Outer, "outer", None, [override])


def test_preset_then_overrides_and_round_trip(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({"outer": {"steps": 7, "inner": {"lr": "1e-3"}}}))
    cfg = resolve(Outer, "outer", str(preset), ["steps=8"])
    assert cfg.steps == 8 and cfg.inner.lr == pytest.approx(1e-3)
    saved = save_resolved(cfg, "outer", tmp_path / "out" / "outer.config.yaml")
    again = resolve(Outer, "outer", str(saved))
    assert again == cfg
    assert yaml.safe_load(saved.read_text())["outer"]["inner"]["betas"] == [0.9, 0.95]


def test_partial_nested_mapping_refines_the_field_default():
    """DecoderTrainConfig.optimizer defaults to betas (0.9, 0.999); setting only grad_clip keeps them."""
    from emu.train.config import DecoderTrainConfig

    cfg = from_dict(DecoderTrainConfig, {"optimizer": {"grad_clip": 2.0}})
    assert cfg.optimizer.betas == (0.9, 0.999) and cfg.optimizer.grad_clip == 2.0
    cfg = resolve(DecoderTrainConfig, "decoder", None, ["optimizer.eps=1e-7"])
    assert cfg.optimizer.betas == (0.9, 0.999) and cfg.optimizer.eps == 1e-7


def test_unknown_key_in_preset_names_the_file(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("outer:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'outer\.stepz' in preset .*p\.yaml"):
        resolve(Outer, "outer", str(preset))


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError, match="known presets: .*tiny"):
        load_preset("no-such-preset")


def test_valid_keys_flattens_nested():
    assert "inner.lr" in valid_keys(Outer) and "steps" in valid_keys(Outer)


@pytest.mark.parametrize("preset", ["tiny", "small", "emu2-37b"])
def test_every_shipped_preset_resolves_every_section(preset):
    data = load_preset(preset)
    unknown = set(data) - set(SECTIONS)
    assert not unknown, f"preset {preset} has sections no stage reads: {unknown}"
    for section, load in SECTIONS.items():
        cfg = resolve(load(), section, preset)
        assert from_dict(load(), to_dict(cfg)) == cfg


def test_emu2_preset_carries_the_paper_settings():
    """Emu2 §2.2.2 / Table 6 (stage 1), §2.2.3 / Table 7 (decoder), §2.3.1 / Table 8 (chat)."""
    s1 = resolve(SECTIONS["stage1"](), "stage1", "emu2-37b")
    assert (s1.lr_projection, s1.lr_lm, s1.lr_encoder) == (1e-4, 3e-5, 5e-5)
    assert s1.optimizer.betas == (0.9, 0.95) and s1.optimizer.eps == 1e-6
    assert s1.batch_sizes == {"image_text": 6144, "video_text": 768}
    assert s1.image_size == 224 and s1.resolution_schedule == [[35200, 448]] and s1.steps == 39200
    s2 = resolve(SECTIONS["stage2"](), "stage2", "emu2-37b")
    assert s2.lr == 1e-5 and s2.steps == 20350 and s2.image_size == 448
    assert s2.batch_sizes["image_text"] == 12800 and s2.batch_sizes["text"] == 800
    dec = resolve(SECTIONS["decoder"](), "decoder", "emu2-37b")
    assert (dec.steps, dec.batch_sizes, dec.lr, dec.condition_drop, dec.noise_offset) == (8000, {"image_text": 2048}, 1e-4, 0.1, 0.1)
    assert dec.optimizer.betas == (0.9, 0.999) and dec.optimizer.weight_decay == 0.01
    chat = resolve(SECTIONS["instruct"](), "instruct", "emu2-37b")
    assert chat.mode == "chat" and chat.steps == 8000 and chat.image_tokens_side == 16
    assert chat.optimizer.betas == (0.9, 0.98) and chat.schedule.warmup_steps == 100
    gen = resolve(SECTIONS["instruct_gen"](), "instruct_gen", "emu2-37b")
    assert gen.mode == "gen" and gen.lr == 5e-5 and gen.steps == 3000


def test_unknown_section_in_preset_is_refused(tmp_path):
    """A misspelt section would be skipped and its settings silently lost."""
    preset = tmp_path / "p.yaml"
    preset.write_text("outer:\n  steps: 3\nvalidat:\n  max_failure_fraction: 0.5\n")
    with pytest.raises(ConfigError, match=r"unknown section 'validat' in preset .*p\.yaml; valid sections: synth, "):
        resolve(Outer, "outer", str(preset))
    preset.write_text("outer:\n  steps: 3\nvalidate:\n  max_failure_fraction: 0.5\n")
    assert resolve(Outer, "outer", str(preset)).steps == 3


def test_tiny_preset_model_and_decoder_build():
    import torch

    from emu.data.tokenizer import train_tokenizer
    from emu.model.decoder import VisualDecoder
    from emu.model.emu import EmuModel

    model_cfg = resolve(SECTIONS["model"](), "model", "tiny")
    decoder_cfg = resolve(SECTIONS["visual_decoder"](), "visual_decoder", "tiny")
    assert decoder_cfg.visual_dim == model_cfg.visual_dim, "the decoder reads the LM's visual embeddings"
    model = EmuModel.build(model_cfg, train_tokenizer(["a red circle"] * 5, 300))
    assert model.encode_images(torch.zeros(1, 3, 64, 64)).shape == (1, 16, 64)
    decoder = VisualDecoder.from_config(decoder_cfg)
    assert decoder_cfg.image_size == 64 and decoder.unet.config.cross_attention_dim == 64


@pytest.mark.parametrize("preset", ["small", "emu2-37b"])
def test_larger_presets_keep_decoder_and_encoder_widths_aligned(preset):
    model_cfg = resolve(SECTIONS["model"](), "model", preset)
    decoder_cfg = resolve(SECTIONS["visual_decoder"](), "visual_decoder", preset)
    assert decoder_cfg.visual_dim == model_cfg.visual_dim
