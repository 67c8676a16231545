"""Synthetic sources in the document-style public formats: MMC4, LLaVA (chat and edit), plain-text
JSON Lines, VQAv2 and COCO captions, each in the exact layout of docs/formats.md.

Every record draws from its own stream `sample_rng(config, <stream>, index)`. VQAv2 and COCO are
evaluation sets: their scenes come from streams no training source uses ("eval-...") and from the
held-out share of scenes that no training source draws (world.held_out), so no evaluation picture
appears in training. JSON is
written in a fixed key order (the public files' order), so one config gives byte-identical files.
Each writer returns the number of records it wrote (documents, conversations, lines, questions,
caption images): what an import of its folder should yield as samples.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from emu.data.schema import IMAGE_PLACEHOLDER
from emu.data.synth import world
from emu.data.synth.config import SynthConfig, sample_rng

#: The importer's default `mmc4.sim_threshold` (OpenFlamingo's value). Off-topic images are written
#: with a similarity below it, so the threshold is exercised and the imported documents are known.
MMC4_SIM_THRESHOLD = 0.24
#: The evaluation splits are written as COCO's 2014 validation split.
EVAL_SPLIT = "val2014"
TRAIN_SPLIT = "train2014"
#: Image ids of the two evaluation sets lie apart: the same id means the same picture in real COCO.
VQA_IMAGE_IDS = 100_000
COCO_IMAGE_IDS = 200_000
VQA_TRAIN_IMAGE_IDS = 300_000
COCO_TRAIN_IMAGE_IDS = 400_000
CAPTION_FRAMES = ("a picture of {}.", "an image showing {}.", "there is {}.", "a drawing with {}.",
                  "{} on a grey background.", "a simple graphic: {}.", "shapes: {}.", "we can see {}.")


def write_mmc4(out: Path, config: SynthConfig) -> int:
    """`docs_shard_{N}_v2.jsonl` (records_per_file documents each) and `images/{image_name}`."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    total = config.count("documents")
    for shard, indices in enumerate(_chunks(total, config.records_per_file)):
        lines = []
        for i in indices:
            doc, pictures = _mmc4_document(config, i)
            for name, data in pictures.items():
                (out / "images" / name).write_bytes(data)
            lines.append(_dumps(doc))
        _write_lines(out / f"docs_shard_{shard}_v2.jsonl", lines)
    return total


def _mmc4_document(config: SynthConfig, i: int) -> tuple[dict[str, Any], dict[str, bytes]]:
    """One web page: captions of its pictures among general facts, each picture matched to a
    sentence. The first picture is always described (so every document keeps an image); a later
    one may be off-topic (matched to a fact with a similarity below the threshold) or a second copy
    of the last described picture, matched to the same caption. Pictures are listed in page order, which is not
    sentence order, so the importer must place them by matched_text_index."""
    rng = sample_rng(config, "mmc4", i)
    text_list: list[str] = []
    entries: list[tuple[int, float, world.Scene]] = []  # (matched sentence, matched_sim, scene)
    described: tuple[int, world.Scene] | None = None    # the last picture a caption describes
    for _ in range(rng.randint(1, config.images_per_document)):
        roll = rng.random()
        if described and roll < 0.2:
            text_list.append(world.paragraph(rng, sentences=1))
            scene = world.sample_scene(rng, config.image_size, max_shapes=config.max_shapes)
            entries.append((len(text_list) - 1, rng.uniform(0.15, MMC4_SIM_THRESHOLD - 0.005), scene))
        elif described and roll < 0.35:
            entries.append((described[0], rng.uniform(0.25, 0.36), described[1]))
        else:
            if rng.random() < 0.5:
                text_list.append(world.paragraph(rng, sentences=1))
            scene = world.sample_scene(rng, config.image_size, max_shapes=config.max_shapes)
            text_list.append(_capitalize(world.caption(scene)))
            described = (len(text_list) - 1, scene)
            entries.append((described[0], rng.uniform(0.25, 0.36), scene))
    rng.shuffle(entries)
    image_info, matrix, pictures = [], [], {}
    for j, (index, sim, scene) in enumerate(entries):
        raw_url = f"https://shapes.example/pictures/{i}/{j}.jpg"
        name = hashlib.sha256(raw_url.encode()).hexdigest()[:12] + ".jpg"
        pictures[name] = world.encode(world.render(scene), "jpg")
        # The matched sentence is the row's best, as in mmc4's assignment (compute_assignments.py).
        row = [round(sim, 6) if k == index else round(rng.uniform(0.1, sim - 0.01), 6) for k in range(len(text_list))]
        matrix.append(row)
        image_info.append({"face_detections": None, "image_name": name, "matched_sim": row[index],
                           "matched_text_index": index, "raw_url": raw_url})
    doc = {"image_info": image_info, "similarity_matrix": matrix, "text_list": text_list,
           "url": f"https://shapes.example/pages/{i}.html",
           "could_have_url_duplicate": int(rng.random() < 0.05)}
    return doc, pictures


def write_llava_chat(out: Path, config: SynthConfig) -> int:
    """`llava_chat.json` (a list of records as in llava_v1_5_mix665k.json) and `images/`: one to
    three questions about a scene, then "Describe the image."; the first human turn opens with
    "<image>\\n". About one record in ten is text-only (no `image` key), as ShareGPT records are."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(config.count("chats")):
        rng = sample_rng(config, "llava-chat", i)
        record_id = f"{i:012d}"
        if rng.random() < 0.1:
            pairs = [("Tell me about the shapes world.", world.paragraph(rng, sentences=rng.randint(2, 4)))]
            records.append({"id": record_id, "conversations": _conversation(pairs)})
            continue
        scene = world.sample_scene(rng, config.image_size, max_shapes=config.max_shapes)
        image = f"images/{record_id}.jpg"
        (out / image).write_bytes(world.encode(world.render(scene), "jpg"))
        conversation = _conversation(world.chat_turns(scene, rng, max_turns=rng.randint(1, 3)))
        conversation[0]["value"] = f"{IMAGE_PLACEHOLDER}\n{conversation[0]['value']}"
        records.append({"id": record_id, "image": image, "conversations": conversation})
    (out / "llava_chat.json").write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return len(records)


def write_llava_edit(out: Path, config: SynthConfig) -> int:
    """`llava_edit.json` and `images/`: multi-image records {"image": [source, target],
    "conversations": [human "<image>\\n<instruction>", gpt "<image>"]}, the LLaVA-NeXT shape the
    importer turns into `gen` samples. PNG, so the target's pixels are exact."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(config.count("edits")):
        rng = sample_rng(config, "llava-edit", i)
        record_id = f"edit-{i:06d}"
        scene = world.sample_scene(rng, config.image_size, max_shapes=config.max_shapes)
        instruction, edited = world.edit(scene, rng)
        paths = [f"images/{record_id}-source.png", f"images/{record_id}-target.png"]
        for path, picture in zip(paths, (scene, edited)):
            (out / path).write_bytes(world.encode(world.render(picture), "png"))
        conversation = [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{instruction}"},
                        {"from": "gpt", "value": IMAGE_PLACEHOLDER}]
        records.append({"id": record_id, "image": paths, "conversations": conversation})
    (out / "llava_edit.json").write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return len(records)


def write_text(out: Path, config: SynthConfig) -> int:
    """`text_{N:05d}.jsonl`: one {"id", "text"} paragraph per line, records_per_file lines a file."""
    out.mkdir(parents=True, exist_ok=True)
    total = config.count("texts")
    for shard, indices in enumerate(_chunks(total, config.records_per_file)):
        lines = []
        for i in indices:
            rng = sample_rng(config, "text", i)
            lines.append(_dumps({"id": f"text-{i:06d}", "text": world.paragraph(rng, sentences=rng.randint(2, 5))}))
        _write_lines(out / f"text_{shard:05d}.jsonl", lines)
    return total


def write_vqav2(out: Path, config: SynthConfig) -> int:
    """The evaluation split (val2014), from scenes no training source uses."""
    return _write_vqav2(out, config, EVAL_SPLIT, "eval-vqav2", config.count("vqa_images"), VQA_IMAGE_IDS, "eval")


def write_vqav2_train(out: Path, config: SynthConfig) -> int:
    """A training split (train2014) for instruction tuning's academic data (Emu2-Chat trains on
    VQAv2's train split, §2.3.1), from its own random stream."""
    return _write_vqav2(out, config, TRAIN_SPLIT, "vqav2-train", config.count("vqa_train_images"),
                        VQA_TRAIN_IMAGE_IDS)


def _write_vqav2(out: Path, config: SynthConfig, split: str, stream: str, count: int, id_base: int,
                 scenes: str = "train") -> int:
    """The VQAv2 questions and annotations files of one subtype and `{split}/COCO_{split}_{id:012d}.jpg`.

    Up to four questions per image (world.questions), question_id = image_id * 1000 + k as in
    the real files, ten annotator answers each with answer_id 1..10; multiple_choice_answer is
    the most frequent answer, as VQAv2 defines it."""
    images_dir = out / split
    images_dir.mkdir(parents=True, exist_ok=True)
    questions, annotations = [], []
    for i in range(count):
        rng = sample_rng(config, stream, i)
        image_id = id_base + i
        scene = world.sample_scene(rng, config.image_size, max_shapes=config.max_shapes, split=scenes)
        (images_dir / _coco_file_name(image_id, split)).write_bytes(world.encode(world.render(scene), "jpg"))
        for k, question in enumerate(world.questions(scene, rng)):
            question_id = image_id * 1000 + k
            questions.append({"image_id": image_id, "question": _capitalize(question.question),
                              "question_id": question_id})
            annotations.append(_vqa_annotation(question, world.annotator_answers(question, rng), rng,
                                               image_id, question_id))
    info = {"year": 2017, "version": "2.0", "description": "Shapes world VQA (VQAv2 layout)",
            "contributor": "emu synth", "url": "https://shapes.example/vqa", "date_created": "2017-04-26 17:00:00"}
    license_ = {"url": "http://creativecommons.org/licenses/by/4.0/",
                "name": "Creative Commons Attribution 4.0 License"}
    _write_json(out / f"v2_OpenEnded_mscoco_{split}_questions.json",
                {"info": info, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": split,
                 "questions": questions, "license": license_})
    _write_json(out / f"v2_mscoco_{split}_annotations.json",
                {"info": info, "license": license_, "data_type": "mscoco", "data_subtype": split,
                 "annotations": annotations})
    return len(questions)


def _vqa_annotation(question: world.Question, answers: list[str], rng: random.Random,
                    image_id: int, question_id: int) -> dict[str, Any]:
    """An annotation in the real files' key order."""
    confidences = rng.choices(("yes", "maybe", "no"), weights=(0.85, 0.1, 0.05), k=len(answers))
    return {"question_type": question.question_type,
            "multiple_choice_answer": Counter(answers).most_common(1)[0][0],
            "answers": [{"answer": answer, "answer_confidence": confidence, "answer_id": n}
                        for n, (answer, confidence) in enumerate(zip(answers, confidences), start=1)],
            "image_id": image_id, "answer_type": question.answer_type, "question_id": question_id}


def write_coco(out: Path, config: SynthConfig) -> int:
    """The evaluation split (val2014), from scenes no training source uses."""
    return _write_coco(out, config, EVAL_SPLIT, "eval-coco", config.count("caption_images"), COCO_IMAGE_IDS, "eval")


def write_coco_train(out: Path, config: SynthConfig) -> int:
    """A training split (train2014) for instruction tuning's academic captioning data."""
    return _write_coco(out, config, TRAIN_SPLIT, "coco-train", config.count("caption_train_images"),
                       COCO_TRAIN_IMAGE_IDS)


def _write_coco(out: Path, config: SynthConfig, split: str, stream: str, count: int, id_base: int,
                scenes: str = "train") -> int:
    """`annotations/captions_{split}.json` and `{split}/COCO_{split}_{id:012d}.jpg`.

    captions_per_image captions per image: the exact caption, then paraphrases of it. Caption ids
    count up in writing order, but the annotations list is shuffled, as COCO's is not grouped by
    image: the importer must group by image_id and keep annotation order."""
    images_dir = out / split
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        rng = sample_rng(config, stream, i)
        image_id = id_base + i
        scene = world.sample_scene(rng, config.image_size, max_shapes=config.max_shapes, split=scenes)
        file_name = _coco_file_name(image_id, split)
        (images_dir / file_name).write_bytes(world.encode(world.render(scene), "jpg"))
        images.append({"license": 1, "file_name": file_name,
                       "coco_url": f"https://shapes.example/{split}/{file_name}",
                       "height": scene.size, "width": scene.size, "date_captured": "2013-11-14 11:18:45",
                       "flickr_url": f"https://shapes.example/flickr/{image_id}.jpg", "id": image_id})
        for text in _captions(scene, rng, config.captions_per_image):
            annotations.append({"image_id": image_id, "id": len(annotations) + 1, "caption": text})
    sample_rng(config, f"{stream}-order", 0).shuffle(annotations)
    info = {"description": "Shapes world captions (COCO layout)", "url": "https://shapes.example/coco",
            "version": "1.0", "year": 2014, "contributor": "emu synth", "date_created": "2017/09/01"}
    licenses = [{"url": "http://creativecommons.org/licenses/by/4.0/", "id": 1,
                 "name": "Creative Commons Attribution 4.0 License"}]
    (out / "annotations").mkdir(exist_ok=True)
    _write_json(out / "annotations" / f"captions_{split}.json",
                {"info": info, "images": images, "licenses": licenses, "annotations": annotations})
    return len(images)


def _captions(scene: world.Scene, rng: random.Random, n: int) -> list[str]:
    """The exact caption, then n - 1 paraphrases that frame it differently (repeating frames only
    when more are asked for than there are)."""
    body = world.caption(scene).rstrip(".")
    frames = rng.sample(CAPTION_FRAMES, min(n - 1, len(CAPTION_FRAMES)))
    frames += [rng.choice(CAPTION_FRAMES) for _ in range(n - 1 - len(frames))]
    return [world.caption(scene)] + [frame.format(body) for frame in frames]


def _conversation(pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    turns = []
    for question, answer in pairs:
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return turns


def _coco_file_name(image_id: int, split: str) -> str:
    # The official VQA API demo: 'COCO_' + dataSubType + '_' + str(imgId).zfill(12) + '.jpg'.
    return f"COCO_{split}_{image_id:012d}.jpg"


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def _chunks(total: int, size: int) -> Iterator[range]:
    """Record indices split into files of `size` records."""
    for start in range(0, total, size):
        yield range(start, min(total, start + size))


def _dumps(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False)


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(_dumps(data), encoding="utf-8")
