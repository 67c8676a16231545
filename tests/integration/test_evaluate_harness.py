"""The benchmark harness end to end on the tiny shapes world, with tiny (untrained) models."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from emu.config import resolve
from emu.data.formats import ImportConfig
from emu.data.prepare import import_sources
from emu.data.schema import VQA
from emu.data.synth import SynthConfig, generate
from emu.data.tokenizer import train_tokenizer
from emu.evaluate import vqa
from emu.evaluate.harness import EvaluateConfig, evaluate, vqa_chance
from emu.model.config import DecoderConfig, EmuConfig
from emu.model.decoder import VisualDecoder
from emu.model.emu import EmuModel
from emu.model.io import save_model

EMU = Path(sys.executable).parent / "emu"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    generate(root / "raw", resolve(SynthConfig, "synth", "tiny", ["scale=0.1"]))
    import_sources(root / "raw", root / "shards", resolve(ImportConfig, "import", "tiny"))
    tok = train_tokenizer(["a red circle at the top left. what color is the square? yes no"] * 20, 400)
    torch.manual_seed(0)
    architecture = resolve(EmuConfig, "model", "tiny")
    save_model(EmuModel.build(architecture, tok), tok, root / "model")
    decoder = VisualDecoder.from_config(resolve(DecoderConfig, "visual_decoder", "tiny"))
    decoder.save_pretrained(root / "decoder")
    save_tiny_clip(root / "clip", tok)
    return root


def save_tiny_clip(folder: Path, tok) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    config = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    tok.save_pretrained(folder)


def test_vqa_chance_is_the_expected_accuracy_of_a_uniform_guess():
    def q(i, qtype, answers, mc):
        return VQA(key=f"q{i}", images=[b"x"], question_id=i, image_id=i, question="?", answers=answers,
                   multiple_choice_answer=mc, question_type=qtype, answer_type="other")
    items = [q(1, "color", ["red"] * 10, "red"), q(2, "color", ["blue"] * 10, "blue"),
             q(3, "yesno", ["yes"] * 7 + ["no"] * 3, "yes")]
    # color: 2 options, each question right for one -> 0.5; yes/no: one option "yes" seen -> acc("yes")
    expected = (0.5 + 0.5 + vqa.vqa_accuracy("yes", items[2].answers)) / 3
    assert vqa_chance(items) == pytest.approx(expected)


def test_harness_writes_predictions_metrics_and_reports(setup, tmp_path):
    config = EvaluateConfig(benches=["vqav2", "coco-captions", "autoencode", "t2i"], data_root=str(setup / "shards"),
                            shots=[0, 2], max_new_tokens=3, caption_tokens=6, clip_model=str(setup / "clip"),
                            inference_steps=2, untrained_baseline=True)
    result = evaluate(config, str(setup / "model"), tmp_path, decoder=str(setup / "decoder"))
    benches = result.metrics["benches"]
    n_questions = sum(1 for _ in json.loads((tmp_path / "vqav2_0shot_predictions.json").read_text()))
    assert benches["vqav2"]["n"] == n_questions > 0, "every benchmark question is scored"
    assert 0 <= benches["vqav2"]["accuracy"] <= 100 and "accuracy_2shot" in benches["vqav2"]
    assert 0 < benches["vqav2"]["chance"] < 100
    assert "cider" in benches["coco-captions"] and "chance" in benches["coco-captions"]
    for name in ("encoder_i", "chance_encoder_i", "clip_i", "fid", "pixel_mse", "baseline_pixel_mse",
                 "baseline_encoder_i", "vae_pixel_mse"):
        assert name in benches["autoencode"]
    # The untrained model here is the evaluated one (both random with the same seed and config).
    assert benches["vqav2"]["baseline_accuracy"] == benches["vqav2"]["accuracy"]
    assert benches["coco-captions"]["baseline_cider"] == pytest.approx(benches["coco-captions"]["cider"])
    summary = result.sections[0].tables[0]
    assert summary.columns[:5] == ["benchmark", "metric", "score", "baseline", "chance"]
    rows = {(row[0], row[1]): row for row in summary.rows}
    assert rows[("vqav2", "accuracy")][3] == benches["vqav2"]["baseline_accuracy"]
    assert rows[("autoencode", "pixel_mse")][3:6] == [benches["autoencode"]["baseline_pixel_mse"], None, "lower"]
    for name in ("clip_t", "clip_i", "chance_clip_i"):
        assert name in benches["t2i"]
    kfp = json.loads((tmp_path / "kfp_metrics.json").read_text())
    assert kfp["vqav2_accuracy"] == benches["vqav2"]["accuracy"] and "coco_captions_cider" in kfp
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/") >= 6, "generated images and reconstructions are inline"
    assert "chance" in (tmp_path / "report.md").read_text()


def test_gate_failure_exits_1_through_the_cli(setup, tmp_path):
    gate = tmp_path / "baseline.yaml"
    gate.write_text("metrics:\n  vqav2_accuracy: {threshold: 101.0, direction: higher}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR")}
    proc = subprocess.run([str(EMU), "evaluate", "--model", str(setup / "model"), "--bench", "vqav2",
                           "--data", str(setup / "shards"), "--out", str(tmp_path / "out"),
                           "--set", f"baseline={gate}", "--set", "max_new_tokens=2"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "gate FAILED" in proc.stdout and "vqav2_accuracy" in proc.stdout
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["gate"]["passed"] is False


def test_missing_benchmark_data_is_a_clear_error(setup, tmp_path):
    from emu.errors import ConfigError

    config = EvaluateConfig(benches=["vqav2"], data_root=str(tmp_path))
    with pytest.raises(ConfigError, match="is not a dataset"):
        evaluate(config, str(setup / "model"), tmp_path / "out")


def test_results_are_also_written_as_lmms_eval_files(setup, tmp_path):
    config = EvaluateConfig(benches=["vqav2", "coco-captions", "autoencode"], data_root=str(setup / "shards"),
                            shots=[0, 2], max_new_tokens=3, caption_tokens=6, inference_steps=2)
    result = evaluate(config, str(setup / "model"), tmp_path, decoder=str(setup / "decoder"))
    benches = result.metrics["benches"]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["results"]) == {"vqav2", "vqav2_2shot", "coco_captions", "autoencode"}
    assert results["results"]["vqav2"]["accuracy,none"] == benches["vqav2"]["accuracy"]
    assert results["results"]["vqav2_2shot"]["accuracy,none"] == benches["vqav2"]["accuracy_2shot"]
    assert results["n-shot"] == {"vqav2": 0, "vqav2_2shot": 2, "coco_captions": 0, "autoencode": 0}
    assert results["config"]["model_args"].startswith(f"pretrained={setup / 'model'}")
    predictions = json.loads((tmp_path / "vqav2_0shot_predictions.json").read_text())
    lines = [json.loads(line) for line in (tmp_path / "samples_vqav2.jsonl").read_text().splitlines()]
    assert results["n-samples"]["vqav2"] == {"original": len(predictions), "effective": len(predictions)}
    # one line per question: its input, prediction, target and score, which average to the metric
    assert [line["resps"][0][0] for line in lines] == [p["answer"] for p in predictions]
    assert all("[IMG]" in line["input"] and line["target"] for line in lines)
    assert sum(line["vqa_accuracy"] for line in lines) / len(lines) == pytest.approx(benches["vqav2"]["accuracy"], abs=0.01)
    captions = [json.loads(line) for line in (tmp_path / "samples_coco_captions.jsonl").read_text().splitlines()]
    assert len(captions) == benches["coco-captions"]["n"] and all(len(c["target"]) >= 1 for c in captions)
    assert sum(c["cider"] for c in captions) / len(captions) == pytest.approx(benches["coco-captions"]["cider"])
    images = [json.loads(line) for line in (tmp_path / "samples_autoencode.jsonl").read_text().splitlines()]
    assert sum(i["pixel_mse"] for i in images) / len(images) == pytest.approx(benches["autoencode"]["pixel_mse"])
