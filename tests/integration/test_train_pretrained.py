"""Stage 1 on the tiny preset started from pretrained parts (Emu2 §2.1): a saved Hugging Face
LM folder with its own (LLaMA-2-style SentencePiece) tokenizer, and an EVA-CLIP checkpoint for
the encoder. The pretrained LM already knows the captions' language, so the captioning loss
starts far below a randomly initialised LM's on the same data and tokenizer."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from emu.config import resolve
from emu.data.shards import iter_samples
from emu.model.config import EmuConfig
from emu.model.io import load_model
from emu.train.config import Stage1Config
from emu.train.stages import stage1
from tests.pretrained import corpus, eva_state_dict, pretrained_llama_folder


@pytest.fixture(scope="module")
def llama(world, tmp_path_factory) -> Path:
    captions = [s.text for s in iter_samples(world / "img2dataset")]
    # smaller than the tiny preset's LM (its sizes are ignored when model.lm.pretrained is set): seconds to train
    return pretrained_llama_folder(tmp_path_factory.mktemp("llama") / "llama", captions + corpus(1500, seed=3),
                                   steps=60, hidden=64, layers=2)


def first_text_loss(out: Path) -> float:
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["text_loss"]


def run(world, out, model_overrides, stage_overrides):
    config = resolve(Stage1Config, "stage1", "tiny", ["runtime.progress=false", "steps=3",
                                                      "batch_sizes.video_text=0", *stage_overrides])
    architecture = resolve(EmuConfig, "model", "tiny", model_overrides)
    return stage1(config, architecture, [world / "img2dataset"], out)


def test_stage1_from_a_pretrained_lm_and_eva_clip_starts_lower(world, llama, tmp_path):
    eva = tmp_path / "EVA-CLIP.safetensors"  # the tiny preset's encoder: 64 px, patch 8, width 64
    save_file({f"visual.{k}": v for k, v in eva_state_dict(width=64, layers=2, mlp_dim=128, patch=8, grid=8).items()},
              str(eva))
    torch.manual_seed(0)
    pretrained = run(world, tmp_path / "pretrained", [f"lm.pretrained={llama}", f"vision.pretrained={eva}"], [])
    scratch = run(world, tmp_path / "scratch", [], [f"tokenizer={llama}"])  # same tokenizer, random LM
    start, baseline = first_text_loss(pretrained.out_dir), first_text_loss(scratch.out_dir)
    assert start < 0.6 * baseline, (start, baseline)
    # it trains: the loss moves on from where it started, and the export holds the LM's tokenizer
    losses = [json.loads(line)["text_loss"] for line in (pretrained.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(v == v for v in losses)
    model, tokenizer = load_model(pretrained.export)
    assert type(tokenizer).__name__ == "LlamaTokenizer" and tokenizer.convert_tokens_to_ids("[PAD]") == 700
    assert model.lm.config.hidden_size == 64 and model.lm.get_input_embeddings().num_embeddings == len(tokenizer)
    assert json.loads((pretrained.export / "emu.json").read_text())["config"]["lm"]["pretrained"] == str(llama)


ZERO3 = ("steps=2", "batch_sizes.video_text=0", "runtime.progress=false", "sequence.packing=false",
         "runtime.micro_batch_size=2", "runtime.zero3_persistence_threshold=0")


def test_pretrained_parts_under_zero3_on_two_ranks_equal_one_rank(world, llama, tmp_path):
    """Under ZeRO-3 the LM loads through transformers' partitioned from_pretrained (and resize),
    the encoder from rank 0's read of the EVA-CLIP file into the partitions: the run equals one
    rank's on the same global batch."""
    from tests.integration.test_train_multirank import run_ranks

    eva = tmp_path / "EVA-CLIP.safetensors"
    save_file(eva_state_dict(width=64, layers=2, mlp_dim=128, patch=8, grid=8), str(eva))  # visual-only layout
    parts = [f"lm.pretrained={llama}", f"vision.pretrained={eva}"]
    one = run(world, tmp_path / "one", parts, [*ZERO3, "runtime.zero_stage=0"]).out_dir
    two = tmp_path / "two"
    run_ranks(2, ["train", "stage1", "--data", str(world / "img2dataset"), "--out", str(two), "--preset", "tiny",
                  *ZERO3, "runtime.zero_stage=3", *(f"model.{p}" for p in parts)])
    records = [[json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] for out in (one, two)]
    torch.testing.assert_close(torch.tensor([r["text_loss"] for r in records[1]]),
                               torch.tensor([r["text_loss"] for r in records[0]]), rtol=1e-4, atol=1e-5)
