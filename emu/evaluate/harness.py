"""The benchmark harness: generate predictions with a model, score them with emu.evaluate's exact
metrics, report each score beside its chance level.

Benchmarks (datasets are shard folders under `evaluate.data_root`, named by `evaluate.datasets`):

  vqav2          VQAv2-format questions; official VQA accuracy; zero-shot and few-shot (k in
                 `evaluate.shots`) with in-context examples retrieved by visual-embedding similarity
                 from the support set (RICES, Flamingo / Emu2 App. E).
  coco-captions  COCO-format captions; CIDEr-D (pycocoevalcap parity).
  autoencode     encode -> visual decoder -> image: similarity to the original in the encoder's
                 space (and CLIP-I with `evaluate.clip_model`), FID on encoder (or CLIP) features.
  t2i            caption -> regressed embeddings (KV cache) -> visual decoder: CLIP-T and CLIP-I
                 (needs `evaluate.clip_model`, a local CLIP folder).

Prompts. `prompt: chat` (instruction-tuned models) uses the chat template the model was tuned
with (emu.data.sequence, academic system message): `[USER]:<image> {question}[ASSISTANT]:`.
`prompt: base` uses Emu2's published prompts (App. E): zero-shot "[image] based on the picture,
answer in one word or phrase. [question] short answer:", few-shot examples "[image] based on the
picture, [question] short answer: [answer]" joined by ". " before the query.

Chance levels, so that a model ignoring its input scores at chance:
  vqav2          expected accuracy of a uniform guess among the answers given to questions of the
                 same question type in the benchmark;
  coco-captions  CIDEr-D of the model's own captions assigned to the wrong images (a derangement);
  autoencode/t2i similarity of each image to a different real image.

Baselines (`baseline_<metric>`), what training must beat:
  vqav2, coco-captions  the same architecture untrained (`evaluate.untrained_baseline`);
  autoencode            the mean image of the benchmark (pixel MSE and encoder similarity): a decoder
                        that ignored its condition could at best output it.

Besides metrics.json and the reports, the results are written as lmms-eval writes them
(emu.evaluate.lmms): results.json and one samples_<task>.jsonl per task.
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from emu.config import resolve, save_resolved, to_dict
from emu.data.schema import VQA, Captions, Chat, Interleaved, Segment, Turn
from emu.data.sequence import IGNORE, SequenceBuilder, SequenceRules
from emu.data.shards import iter_samples
from emu.errors import ConfigError
from emu.evaluate import cider, lmms, metrics, report, vqa
from emu.evaluate.gate import check_gate, gate_lines, gate_table, load_gate

log = logging.getLogger(__name__)

BENCHES = ("vqav2", "coco-captions", "autoencode", "t2i")
ZERO_SHOT_VQA = "based on the picture, answer in one word or phrase. {question} short answer:"
FEW_SHOT_VQA = "based on the picture, {question} short answer:"


@dataclass
class EvaluateConfig:
    """Settings of `emu evaluate` (the `evaluate` section of a preset)."""

    benches: list[str] = field(default_factory=lambda: ["vqav2", "coco-captions"])
    #: Folder holding the benchmark datasets (e.g. the `shards/` folder of `emu data prepare`).
    data_root: str = ""
    #: Dataset folder (under data_root) of each benchmark, and of the RICES support set.
    datasets: dict[str, str] = field(default_factory=lambda: {
        "vqav2": "vqav2", "coco-captions": "coco", "autoencode": "coco", "t2i": "coco",
        "vqav2-support": "vqav2-train", "coco-captions-support": "coco-train"})
    prompt: Literal["chat", "base"] = "chat"
    #: In-context examples for VQA: 0 is zero-shot; k > 0 retrieves k examples with RICES.
    shots: list[int] = field(default_factory=lambda: [0])
    max_new_tokens: int = 12
    caption_tokens: int = 40
    num_beams: int = 1           # Emu2-Chat evaluates with 5 beams (App. E)
    batch_size: int = 16
    limit: int = 0               # evaluate only the first N items (0 = all); always reported
    #: Local Hugging Face CLIP folder for CLIP-T / CLIP-I (Emu2: CLIP-ViT-B for T, ViT-L for I).
    clip_model: str = ""
    #: Image features for FID: the evaluated model's encoder, or the CLIP vision tower.
    fid_features: Literal["encoder", "clip"] = "encoder"
    guidance_scale: float = 3.0
    inference_steps: int = 0     # 0 = the decoder's own (Emu2: 50)
    #: Also score the same architecture untrained (random weights, or the pretrained parts the
    #: model section names) on vqav2 and coco-captions: the `baseline_*` figures the report shows
    #: beside each score. It builds and runs a second model, so presets of big models leave it off.
    untrained_baseline: bool = False
    #: Gate file (thresholds per metric); empty = no gate.
    baseline: str = ""
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [b for b in self.benches if b not in BENCHES]
        if unknown:
            raise ConfigError(f"evaluate.benches: unknown {unknown}; benchmarks: {', '.join(BENCHES)}")
        if any(k < 0 for k in self.shots) or not self.shots:
            raise ConfigError(f"evaluate.shots must be non-negative integers, got {self.shots}")
        for name in ("max_new_tokens", "caption_tokens", "num_beams", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"evaluate.{name} must be >= 1")
        if self.limit < 0:
            raise ConfigError(f"evaluate.limit must be >= 0, got {self.limit}")


@dataclass
class Prompt:
    """One generation request: token ids, and the visuals (in order) its placeholders take."""

    ids: list[int]
    images: list[bytes]


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    out_dir: Path
    gate: dict[str, Any] | None = None
    #: The report's sections, so a caller can add its own (the pipeline's promotion gate) and
    #: write the reports again (write_reports).
    sections: list[report.Section] = field(default_factory=list)


# ---- entry points -------------------------------------------------------------------------------

def run_from_cli(*, model: str, benches: list[str], out: Path, preset: str | None, overrides: list[str],
                 decoder: str | None = None, data: str | None = None) -> int:
    """`emu evaluate --model M --bench B --out D`: 0 when done (and the gate, if any, passed), 1
    when the gate failed."""
    extra = [f"benches=[{', '.join(benches)}]"] if benches else []
    if data:
        extra.append(f"data_root={data}")
    config = resolve(EvaluateConfig, "evaluate", preset, extra + overrides)
    result = evaluate(config, model, out, decoder=decoder)
    for line in summary_lines(result.metrics):
        print(line)
    if result.gate is not None:
        for line in gate_lines(result.gate):
            print(line)
        return 0 if result.gate["passed"] else 1
    return 0


def evaluate(config: EvaluateConfig, model_path: str, out: Path, decoder: str | None = None) -> EvalResult:
    """Run the configured benchmarks on a model (and its visual decoder); write predictions,
    metrics.json, kfp_metrics.json, report.md and report.html under `out`."""
    from emu.model.io import load_model

    if not config.data_root:
        raise ConfigError("evaluate.data_root must name the folder holding the benchmark datasets")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(config, "evaluate", out / "evaluate.config.yaml")
    torch.manual_seed(config.seed)
    model, tokenizer = load_model(model_path)
    model.eval()
    runner = _Runner(config, model, tokenizer, out, decoder)
    results: dict[str, Any] = {}
    sections: list[report.Section] = []
    for bench in config.benches:
        started = time.perf_counter()
        result, section = getattr(runner, bench.replace("-", "_"))()
        result["seconds"] = round(time.perf_counter() - started, 2)
        results[bench] = result
        sections.append(section)
        log.info("%s: %s", bench, {k: v for k, v in result.items() if not isinstance(v, (dict, list))})
    payload = {"model": str(model_path), "decoder": decoder, "benches": results}
    gate = None
    sections.insert(0, report.Section("Summary", tables=[summary_table(results)]))
    if config.baseline:
        gate = check_gate(flat_metrics(results), load_gate(config.baseline)).to_dict(against=f"baseline {config.baseline}")
        payload["gate"] = gate
        sections.insert(1, report.Section("Gate", tables=[gate_table(gate)]))
    (out / "metrics.json").write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
    (out / "kfp_metrics.json").write_text(json.dumps(flat_metrics(results), indent=2), encoding="utf-8")
    lmms.write_results(out, results, runner.samples, config=to_dict(config), model=str(model_path), decoder=decoder)
    write_reports(out, sections)
    return EvalResult(metrics=payload, out_dir=out, gate=gate, sections=sections)


def write_reports(out: Path, sections: list[report.Section]) -> None:
    """report.md (+ report.json) and the self-contained report.html of an evaluation folder."""
    report.write_markdown_report(out / "report.md", "Emu evaluation", sections, overwrite=True)
    report.write_html_report(out / "report.html", "Emu evaluation", sections, overwrite=True)


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """The headline numbers, named for KFP Metrics and the gate: `<bench>_<metric>`."""
    flat: dict[str, float] = {}
    for bench, result in results.items():
        for name, value in result.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "seconds" \
                    and math.isfinite(value):
                flat[report.metric_name(bench, name)] = float(value)
    return flat


def summary_table(results: dict[str, Any]) -> report.Table:
    """One row per metric: its score beside its baseline (`baseline_<metric>`: the untrained model,
    the mean image) and its chance level (`chance_<metric>`, else the bench's `chance`), and which
    way it improves."""
    from emu.evaluate.gate import direction_of

    rows = []
    for bench, result in results.items():
        for name, value in result.items():
            if name.startswith(("chance", "baseline_")) or name in ("n", "seconds") \
                    or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            chance = result.get(f"chance_{name}", result.get("chance"))
            baseline = result.get(f"baseline_{name}")
            rows.append([bench, name, float(value), None if baseline is None else float(baseline),
                         None if chance is None else float(chance), direction_of(name), result.get("n")])
    return report.Table(columns=["benchmark", "metric", "score", "baseline", "chance", "better", "items"], rows=rows,
                        caption="baseline: the same model untrained (VQA, captions), the benchmark's mean image "
                                "(autoencoding); chance: an answer or image that ignores the input")


def summary_lines(payload: dict[str, Any]) -> list[str]:
    table = summary_table(payload["benches"])
    lines = [f"{'benchmark':<15} {'metric':<22} {'score':>9} {'baseline':>9} {'chance':>9} {'items':>6}"]
    for bench, name, score, baseline, chance, _, n in table.rows:
        lines.append(f"{bench:<15} {name:<22} {score:>9.3f} {_cell(baseline):>9} {_cell(chance):>9} {n or '':>6}")
    return lines


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:9.3f}"


# ---- the benchmarks -----------------------------------------------------------------------------

class _Runner:
    def __init__(self, config: EvaluateConfig, model, tokenizer, out: Path, decoder: str | None):
        self.config, self.model, self.tokenizer, self.out = config, model, tokenizer, out
        self.decoder_path = decoder
        self._decoder = None
        self._untrained_model = None
        #: task -> one record per question or image (emu.evaluate.lmms writes samples_<task>.jsonl)
        self.samples: dict[str, list[dict[str, Any]]] = {}
        rules = dict(image_tokens=model.config.tokens_per_image(),
                     frame_tokens=model.config.tokens_per_image(model.config.video_tokens_side), max_len=1 << 16)
        self.chat = SequenceBuilder(tokenizer, SequenceRules(mode="chat", **rules))
        self.base = SequenceBuilder(tokenizer, SequenceRules(mode="pretrain", image_text_order_p=1.0, **rules))
        self.gen = SequenceBuilder(tokenizer, SequenceRules(mode="gen", **rules))

    # -- data -------------------------------------------------------------------------------

    def _dataset(self, name: str) -> Path:
        folder = Path(self.config.data_root) / self.config.datasets.get(name, name)
        if not (folder / "dataset.json").is_file():
            raise ConfigError(f"benchmark data {name!r}: {folder} is not a dataset (evaluate.datasets.{name})")
        return folder

    def _items(self, name: str, kind: type) -> list:
        items = [s for s in iter_samples(self._dataset(name)) if isinstance(s, kind)]
        if self.config.limit:
            items = items[: self.config.limit]
        if not items:
            raise ConfigError(f"benchmark {name!r} has no {kind.kind} samples in {self._dataset(name)}")
        return items

    # -- VQA -------------------------------------------------------------------------------------

    def vqav2(self) -> tuple[dict[str, Any], report.Section]:
        items = self._items("vqav2", VQA)
        questions, annotations = vqa_files(items)
        result: dict[str, Any] = {"n": len(items), "chance": 100.0 * vqa_chance(items)}
        examples = []
        support = self._rices_support("vqav2-support", VQA) if any(self.config.shots) else None
        for k in self.config.shots:
            prompts = [self._vqa_prompt(item, support.nearest(item, k) if k else []) for item in items]
            answers = self._generate(prompts, self.config.max_new_tokens)
            predictions = [{"question_id": item.question_id, "answer": answer} for item, answer in zip(items, answers)]
            (self.out / f"vqav2_{k}shot_predictions.json").write_text(json.dumps(predictions, indent=1))
            scored = vqa.score_vqa(questions, annotations, predictions, per_question=True)
            result["accuracy" if k == 0 else f"accuracy_{k}shot"] = scored["overall"]
            self.samples["vqav2" if k == 0 else f"vqav2_{k}shot"] = [
                {"doc_id": i, "doc": {"question_id": item.question_id, "image_id": item.image_id,
                                      "question": item.question, "question_type": item.question_type,
                                      "answer_type": item.answer_type, "answers": list(item.answers)},
                 "input": self._text(prompt), "target": item.multiple_choice_answer, "resps": [[answer]],
                 "filtered_resps": [answer], "vqa_accuracy": scored["per_question"][str(item.question_id)]}
                for i, (item, prompt, answer) in enumerate(zip(items, prompts, answers))]
            if k == 0:
                result["per_answer_type"] = scored["per_answer_type"]
                examples = [[item.question, answer, item.multiple_choice_answer] for item, answer in
                            zip(items[:8], answers[:8])]
        if self.config.untrained_baseline:
            answers = self._generate([self._vqa_prompt(item, []) for item in items], self.config.max_new_tokens,
                                     self._untrained())
            predictions = [{"question_id": item.question_id, "answer": answer} for item, answer in zip(items, answers)]
            result["baseline_accuracy"] = vqa.score_vqa(questions, annotations, predictions)["overall"]
        section = report.Section(
            "VQAv2 (shapes world)", text=f"{len(items)} questions; official VQA accuracy; chance = uniform guess "
                                         "among the answers to the same question type"
                                         + ("; baseline = the same model untrained." if self.config.untrained_baseline
                                            else "."),
            tables=[report.Table(["question", "prediction", "answer"], examples, caption="Examples")],
            figures=[report.Figure(item.images[0], item.question) for item in items[:4]])
        return result, section

    def _vqa_prompt(self, item: VQA, shots: list[VQA]) -> Prompt:
        if self.config.prompt == "chat":
            turns, images = [], []
            for example in [*shots, item]:
                turns += [Turn("user", f"<image> {example.question}"),
                          Turn("assistant", example.multiple_choice_answer or "x")]
                images.append(example.images[0])
            chat = Chat(key=item.key, images=images, turns=turns, category="academic")
            return self._cut(self.chat.build(chat, random.Random(0))[0], images)
        segments, images = [], []
        for example in shots:
            segments += [Segment(image=len(images)),
                         Segment(text=FEW_SHOT_VQA.format(question=example.question) + f" {example.multiple_choice_answer}.")]
            images.append(example.images[0])
        segments += [Segment(image=len(images)), Segment(text=ZERO_SHOT_VQA.format(question=item.question))]
        images.append(item.images[0])
        return self._base_prompt(item.key, segments, images)

    # -- captions ----------------------------------------------------------------------------

    def coco_captions(self) -> tuple[dict[str, Any], report.Section]:
        items = self._items("coco-captions", Captions)
        annotations = coco_file(items)
        if self.config.prompt == "chat":
            prompts = [self._cut(self.chat.build(Captions(key=c.key, images=c.images, image_id=c.image_id,
                                                          captions=["x"]), random.Random(0))[0], c.images)
                       for c in items]
        else:
            prompts = [self._base_prompt(c.key, [Segment(image=0)], c.images) for c in items]
        captions = self._generate(prompts, self.config.caption_tokens)
        predictions = [{"image_id": c.image_id, "caption": text} for c, text in zip(items, captions)]
        (self.out / "coco_captions_predictions.json").write_text(json.dumps(predictions, indent=1))
        scored = cider.score_captions(annotations, predictions, per_image=True)
        deranged = [{"image_id": p["image_id"], "caption": captions[(i + 1) % len(captions)]}
                    for i, p in enumerate(predictions)] if len(captions) > 1 else predictions
        chance = cider.score_captions(annotations, deranged)["cider"]
        result = {"n": len(items), "cider": scored["cider"], "chance": chance}
        if self.config.untrained_baseline:
            untrained = self._generate(prompts, self.config.caption_tokens, self._untrained())
            result["baseline_cider"] = cider.score_captions(
                annotations, [{"image_id": c.image_id, "caption": text} for c, text in zip(items, untrained)])["cider"]
        self.samples["coco_captions"] = [
            {"doc_id": i, "doc": {"image_id": c.image_id}, "input": self._text(prompt), "target": list(c.captions),
             "resps": [[text]], "filtered_resps": [text], "cider": scored["per_image"][str(c.image_id)]}
            for i, (c, prompt, text) in enumerate(zip(items, prompts, captions))]
        section = report.Section(
            "COCO captions (shapes world)", text="CIDEr-D (pycocoevalcap parity); chance = the same captions "
                                                 "given to the wrong images"
                                                 + ("; baseline = the same model untrained."
                                                    if self.config.untrained_baseline else "."),
            figures=[report.Figure(c.images[0], f"{text} | reference: {c.captions[0]}")
                     for c, text in zip(items[:6], captions[:6])])
        return result, section

    # -- images ------------------------------------------------------------------------------

    def autoencode(self) -> tuple[dict[str, Any], report.Section]:
        items = self._items("autoencode", Captions)
        real = [_pil(c.images[0]) for c in items]
        conditions = self._encode(real)
        recon = self._decode(conditions)
        # The VAE alone (encode, decode the posterior mode): the best the diffusion decoder can reach.
        through_vae = self._through_vae(real)
        mean = _mean_image(real)
        result = {"n": len(items), **self._image_similarity(recon, real),
                  "baseline_encoder_i": self._image_similarity([mean] * len(real), real)["encoder_i"],
                  "pixel_mse": _pixel_mse(recon, real), "baseline_pixel_mse": _pixel_mse([mean] * len(real), real),
                  "vae_pixel_mse": _pixel_mse(through_vae, real)}
        result["fid"] = self._fid(real, recon)
        gen_e, real_e = self._features(recon), self._features(real)
        self.samples["autoencode"] = [
            {"doc_id": i, "doc": {"image_id": c.image_id}, "target": "the input image",
             "pixel_mse": _pixel_mse([r], [x]), "encoder_i": metrics.clip_i(g[None], e[None])["mean"]}
            for i, (c, r, x, g, e) in enumerate(zip(items, recon, real, gen_e, real_e))]
        figures = [report.Figure(_row([a, v, b]), "original | VAE alone | decoder (diffusion)")
                   for a, v, b in zip(real[:6], through_vae[:6], recon[:6])]
        return result, report.Section("Autoencoding (encode -> decoder)", figures=figures,
                                      text="Similarity of each reconstruction to its original (encoder_i: cosine of "
                                           "mean encoder embeddings; pixel_mse: on [0, 1] pixels, lower is better); "
                                           "chance = a different original; baseline = the benchmark's mean image; "
                                           "vae_pixel_mse = the VAE alone, the decoder's ceiling.")

    def t2i(self) -> tuple[dict[str, Any], report.Section]:
        from emu.data.schema import Pair
        from emu.model.generation import generate_image_embeddings

        if not self.config.clip_model:
            raise ConfigError("the t2i benchmark needs evaluate.clip_model (a local CLIP folder) for CLIP-T")
        items = self._items("t2i", Captions)
        real = [_pil(c.images[0]) for c in items]
        captions = [c.captions[0] for c in items]
        embeddings = []
        n = self.model.config.tokens_per_image()
        for caption in captions:
            seq = self.gen.build(Pair(key="t2i", images=[b"\x89PNG"], text=caption), random.Random(0))[0]
            start = seq.ids.index(self.tokenizer.convert_tokens_to_ids("[IMG]"))
            ids = torch.tensor([seq.ids[: start + 1]])
            embeddings.append(generate_image_embeddings(self.model, ids, n)[0])
        images = self._decode(torch.stack(embeddings))
        clip = _Clip(self.config.clip_model)
        gen_i, real_i, text_t = clip.images(images), clip.images(real), clip.texts(captions)
        result = {"n": len(items), "clip_t": metrics.clip_t(gen_i, text_t)["mean"],
                  "clip_i": metrics.clip_i(gen_i, real_i)["mean"],
                  "chance_clip_i": metrics.clip_i(torch.roll(real_i, 1, 0), real_i)["mean"],
                  "chance_clip_t": metrics.clip_t(torch.roll(real_i, 1, 0), text_t)["mean"]}
        self.samples["t2i"] = [
            {"doc_id": i, "doc": {"image_id": c.image_id}, "input": caption, "target": "the caption's image",
             "clip_t": metrics.clip_t(g[None], t[None])["mean"], "clip_i": metrics.clip_i(g[None], r[None])["mean"]}
            for i, (c, caption, g, t, r) in enumerate(zip(items, captions, gen_i, text_t, real_i))]
        figures = [report.Figure(img, cap) for img, cap in zip(images[:6], captions[:6])]
        return result, report.Section("Text to image", figures=figures)

    def _image_similarity(self, generated: list[Image.Image], real: list[Image.Image]) -> dict[str, float]:
        gen_e, real_e = self._features(generated), self._features(real)
        out = {"encoder_i": metrics.clip_i(gen_e, real_e)["mean"],
               "chance_encoder_i": metrics.clip_i(torch.roll(real_e, 1, 0), real_e)["mean"]}
        if self.config.clip_model:
            clip = _Clip(self.config.clip_model)
            g, r = clip.images(generated), clip.images(real)
            out["clip_i"] = metrics.clip_i(g, r)["mean"]
            out["chance_clip_i"] = metrics.clip_i(torch.roll(r, 1, 0), r)["mean"]
        return out

    def _fid(self, real: list[Image.Image], generated: list[Image.Image]) -> float:
        if len(real) < 3:
            return float("nan")
        if self.config.fid_features == "clip":
            clip = _Clip(self.config.clip_model)
            return metrics.fid_from_features(clip.images(real), clip.images(generated))
        return metrics.fid_from_features(self._features(real), self._features(generated))

    def _features(self, images: list[Image.Image]) -> torch.Tensor:
        """Mean-pooled encoder embedding per image (the RICES and FID feature)."""
        return self._encode(images).mean(dim=1).float()

    # -- model calls -------------------------------------------------------------------------

    @torch.no_grad()
    def _encode(self, images: list[Image.Image], model=None) -> torch.Tensor:
        from emu.model.vision import preprocess

        model = model or self.model
        out = []
        for i in range(0, len(images), self.config.batch_size):
            pixels = preprocess(images[i:i + self.config.batch_size], model.visual.config)
            out.append(model.encode_images(pixels))
        return torch.cat(out)

    def _untrained(self):
        """The evaluated architecture before training: built from its config with the evaluation
        seed (random weights, or the pretrained parts its model section names)."""
        if self._untrained_model is None:
            from emu.model.emu import EmuModel

            with torch.random.fork_rng():
                torch.manual_seed(self.config.seed)
                self._untrained_model = EmuModel.build(self.model.config, self.tokenizer).eval()
        return self._untrained_model

    @torch.no_grad()
    def _through_vae(self, images: list[Image.Image]) -> list[Image.Image]:
        from emu.precompute.encoder import unit_range

        decoder = self._visual_decoder()
        out = []
        for i in range(0, len(images), self.config.batch_size):
            batch = [img.resize((decoder.config.image_size,) * 2, Image.BICUBIC) for img in images[i:i + self.config.batch_size]]
            latents = decoder.encode_latents(unit_range(batch), sample=False)
            out += [_tensor_to_pil(img) for img in decoder.decode_latents(latents)]
        return out

    @torch.no_grad()
    def _decode(self, conditions: torch.Tensor) -> list[Image.Image]:
        decoder = self._visual_decoder()
        steps = self.config.inference_steps or None
        images = []
        generator = torch.Generator().manual_seed(self.config.seed)
        for i in range(0, len(conditions), self.config.batch_size):
            batch = decoder.sample(conditions[i:i + self.config.batch_size].float(), num_inference_steps=steps,
                                   guidance_scale=self.config.guidance_scale, generator=generator)
            images += [_tensor_to_pil(img) for img in batch]
        return images

    def _visual_decoder(self):
        if self._decoder is None:
            if not self.decoder_path:
                raise ConfigError("this benchmark decodes images: pass --decoder (a visual decoder folder)")
            from emu.model.decoder import VisualDecoder

            self._decoder = VisualDecoder.from_pretrained(self.decoder_path).eval()
        return self._decoder

    @torch.no_grad()
    def _generate(self, prompts: list[Prompt], max_new_tokens: int, model=None) -> list[str]:
        from emu.model.generation import generate_text

        model = model or self.model
        tok = self.tokenizer
        texts: list[str] = []
        for start in range(0, len(prompts), self.config.batch_size):
            batch = prompts[start:start + self.config.batch_size]
            width = max(len(p.ids) for p in batch)
            ids = torch.tensor([[tok.pad_token_id] * (width - len(p.ids)) + p.ids for p in batch])
            mask = torch.tensor([[0] * (width - len(p.ids)) + [1] * len(p.ids) for p in batch])
            images = [_pil(data) for p in batch for data in p.images]
            embeds = self._encode(images, model) if images else None
            new = generate_text(model, ids, attention_mask=mask, image_embeds=embeds,
                                max_new_tokens=max_new_tokens, num_beams=self.config.num_beams,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            texts += [_answer(tok.decode(row, skip_special_tokens=True)) for row in new]
        return texts

    # -- prompts -----------------------------------------------------------------------------

    def _text(self, prompt: Prompt) -> str:
        """A prompt as text, special tokens (image placeholders included) kept: a sample's input."""
        return self.tokenizer.decode(prompt.ids, skip_special_tokens=False)

    def _cut(self, sequence, images: list[bytes]) -> Prompt:
        """A chat sequence up to where its last answer starts: what the model must continue."""
        starts = [t for t in range(len(sequence.targets))
                  if sequence.targets[t] != IGNORE and (t == 0 or sequence.targets[t - 1] == IGNORE)]
        return Prompt(ids=sequence.ids[: starts[-1] + 1], images=images)

    def _base_prompt(self, key: str, segments: list[Segment], images: list[bytes]) -> Prompt:
        sequence = self.base.build(Interleaved(key=key, images=images, segments=segments), random.Random(0))[0]
        ids = sequence.ids[:-1] if sequence.ids[-1] == self.tokenizer.eos_token_id else sequence.ids
        return Prompt(ids=ids, images=images)

    def _rices_support(self, name: str, kind: type) -> _Rices:
        support = [s for s in iter_samples(self._dataset(name)) if isinstance(s, kind)]
        return _Rices(support, self._features([_pil(s.images[0]) for s in support]), self)


class _Rices:
    """Retrieval-based in-context example selection: the k support items whose images are most
    similar (cosine of mean visual embeddings) to the query image, most similar last (nearest
    the query, as OpenFlamingo orders them)."""

    def __init__(self, items: list, features: torch.Tensor, runner: _Runner):
        self.items, self.runner = items, runner
        self.features = torch.nn.functional.normalize(features, dim=-1)

    def nearest(self, query, k: int) -> list:
        q = torch.nn.functional.normalize(self.runner._features([_pil(query.images[0])]), dim=-1)[0]
        order = torch.argsort(self.features @ q, descending=True).tolist()
        chosen = [self.items[i] for i in order if self.items[i].key != query.key][:k]
        return list(reversed(chosen))


class _Clip:
    """A local Hugging Face CLIP model: image and text embeddings for CLIP-T / CLIP-I."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        from emu.model.io import local_folder

        folder = str(local_folder(path))
        self.model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
        self.image_processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        inputs = self.image_processor(images=images, return_tensors="pt")
        return _features(self.model.get_image_features(**inputs))

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        inputs = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                                max_length=self.model.config.text_config.max_position_embeddings)
        return _features(self.model.get_text_features(input_ids=inputs["input_ids"],
                                                      attention_mask=inputs["attention_mask"]))


def _features(output) -> torch.Tensor:
    """transformers 5 returns a model output from get_*_features; older versions a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


# ---- benchmark files and chance ----------------------------------------------------------------

def vqa_files(items: list[VQA]) -> tuple[dict, dict]:
    """The VQAv2 questions and annotations objects of the benchmark items (what score_vqa reads)."""
    questions = {"data_subtype": "bench", "questions": [
        {"image_id": q.image_id, "question": q.question, "question_id": q.question_id} for q in items]}
    annotations = {"data_subtype": "bench", "annotations": [
        {"question_id": q.question_id, "image_id": q.image_id, "question_type": q.question_type,
         "answer_type": q.answer_type, "multiple_choice_answer": q.multiple_choice_answer,
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(q.answers)]}
        for q in items]}
    return questions, annotations


def vqa_chance(items: list[VQA]) -> float:
    """Expected accuracy of a uniform guess among the answers to questions of the same type."""
    candidates: dict[str, set[str]] = defaultdict(set)
    for q in items:
        candidates[q.question_type].add(q.multiple_choice_answer)
    total = 0.0
    for q in items:
        options = sorted(candidates[q.question_type])
        total += sum(vqa.vqa_accuracy(option, q.answers) for option in options) / len(options)
    return total / len(items)


def coco_file(items: list[Captions]) -> dict:
    return {"images": [{"id": c.image_id} for c in items],
            "annotations": [{"image_id": c.image_id, "id": i, "caption": text}
                            for i, (c, text) in enumerate((c, t) for c in items for t in c.captions)]}


def _answer(text: str) -> str:
    """The generated answer: up to the first line break, whitespace trimmed."""
    return text.strip().split("\n")[0].strip()


def _pil(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def _tensor_to_pil(image_CHW: torch.Tensor) -> Image.Image:
    array = (image_CHW.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def _row(images: list[Image.Image], height: int = 128) -> Image.Image:
    """Images side by side, each scaled (nearest: pixels stay visible) to `height`: a 64-pixel
    original and its reconstructions are too small to judge at their own size."""
    scaled = [img.resize((round(img.width * height / img.height), height), Image.NEAREST) for img in images]
    canvas = Image.new("RGB", (sum(img.width for img in scaled) + 4 * (len(scaled) - 1), height), (255, 255, 255))
    x = 0
    for img in scaled:
        canvas.paste(img, (x, 0))
        x += img.width + 4
    return canvas


def _mean_image(images: list[Image.Image]) -> Image.Image:
    """The pixel-wise mean of `images` (all resized to the first one's size)."""
    import numpy as np

    size = images[0].size
    mean = np.mean([np.asarray(img.resize(size), dtype=np.float64) for img in images], axis=0)
    return Image.fromarray(mean.round().astype(np.uint8))


def _pixel_mse(generated: list[Image.Image], real: list[Image.Image]) -> float:
    """Mean squared error on [0, 1] pixels, each generated image resized to its original's size."""
    import numpy as np

    errors = [np.mean((np.asarray(g.resize(r.size), dtype=np.float64) / 255 - np.asarray(r, dtype=np.float64) / 255) ** 2)
              for g, r in zip(generated, real)]
    return float(np.mean(errors))

