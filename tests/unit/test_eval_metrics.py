"""emu.evaluate: official VQA accuracy, CIDEr-D scoring, EM, CLIP cosines, FID, gate, reports, CLI.

Expected VQA values are worked out by hand from vqaEval.py (../notes/formats.md §9): with m of
the 10 GT answers matching, leave-one-out gives [m*min(1,(m-1)/3) + (10-m)*min(1,m/3)] / 10,
i.e. 0, 0.3, 0.6, 0.9, 1.0 for m = 0, 1, 2, 3, >= 4. Parity with pycocoevalcap and the Java
tokenizer is in test_eval_parity.py.
"""

from __future__ import annotations

import base64
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from emu.errors import ConfigError, EmuError, SourceError
from emu.evaluate import EvaluationError
from emu.evaluate.gate import GateConfig, check_gate, load_gate
from emu.evaluate.metrics import (clip_i, clip_t, exact_match, fid_from_features, frechet_distance,
                                  gaussian_statistics, normalize_em)
from emu.evaluate.report import (Figure, Section, Table, kfp_metrics, metric_name, write_html_report,
                                 write_markdown_report, write_metrics_json)
from emu.evaluate.vqa import (CONTRACTIONS, MANUAL_MAP, process_digit_article, process_punctuation,
                              score_vqa, vqa_accuracy)

EMU = Path(sys.executable).parent / "emu"


def ladder(m: int) -> float:
    return (m * min(1, (m - 1) / 3) + (10 - m) * min(1, m / 3)) / 10


# ---------------------------------------------------------------------------------------------
# VQA: normalisation functions


@pytest.mark.parametrize("text, expected", [
    ("1,000", "1000"),                     # digit,digit: punct deleted, not spaced
    ("1,000 (approx)", "1000 approx"),     # ... every punct char in the text, parentheses too
    ("a(b", "a b"),                        # no digit,digit: replaced by a space
    ("hello, world", "hello world"),       # ", " has a space next to it: deleted
    ("3.5", "3.5"),                        # period before a digit stays
    ("3.5.", "3.5"),                       # a period not followed by a digit goes
    ("e.g.", "eg"),
    ("it's", "it's"),                      # apostrophe is not in punct
    ("10:30", "10:30"),                    # nor colon
    ("yes!", "yes "),
    ("." * 40, "." * 8),                   # re.UNICODE passed as count: only 32 removed
])
def test_process_punctuation_matches_vqaeval(text, expected):
    assert process_punctuation(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("Two", "2"), ("none", "0"), ("ten dogs", "10 dogs"), ("eleven", "eleven"),
    ("The dog", "dog"), ("an apple a day", "apple day"),
    ("dont", "don't"), ("Dont know", "don't know"), ("Im", "im"),  # lower-cased first: "im" is no key
    ("somebody'd", "somebodyd"),  # an odd official entry, kept
    ("  many   spaces ", "many spaces"),
])
def test_process_digit_article_matches_vqaeval(text, expected):
    assert process_digit_article(text) == expected


def test_tables_are_the_official_ones():
    assert len(CONTRACTIONS) == 120 and CONTRACTIONS["dont"] == "don't" and CONTRACTIONS["twas"] == "'twas"
    assert MANUAL_MAP == {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                          "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}


# ---------------------------------------------------------------------------------------------
# VQA: per-question accuracy


@pytest.mark.parametrize("m", range(11))
def test_leave_one_out_ladder(m):
    acc = vqa_accuracy("yes", ["yes"] * m + ["no"] * (10 - m))
    assert acc == pytest.approx(ladder(m), abs=1e-12)
    assert acc == pytest.approx([0, 0.3, 0.6, 0.9, 1, 1, 1, 1, 1, 1, 1][m], abs=1e-12)


@pytest.mark.parametrize("prediction, answers, expected", [
    # annotators agree: NOTHING is normalised, not even case or the period
    ("Yes.", ["yes"] * 10, 0.0),
    ("Yes", ["yes"] * 10, 0.0),
    ("yes", ["yes"] * 10, 1.0),
    ("two", ["2"] * 10, 0.0),
    (" yes\n", ["yes"] * 10, 1.0),                             # \n, \t -> space and strip always apply
    # annotators disagree: both sides normalised
    ("Yes.", ["yes"] * 9 + ["no"], 1.0),
    ("two", ["2"] * 4 + ["3"] * 6, 1.0),                       # number word -> digit
    ("two", ["two", "2", "2"] + ["3"] * 7, 0.9),               # GT "two" -> "2" too: m = 3
    ("the umbrella", ["umbrella", "an umbrella"] + ["bag"] * 8, 0.6),  # articles dropped
    ("dont", ["don't"] * 3 + ["no"] * 7, 0.9),                 # contraction restored
    ("1,000", ["1000"] * 2 + ["many"] * 8, 0.6),               # comma in a number deleted
    ("3.5", ["3.5"] + ["4"] * 9, 0.3),                         # decimal point kept
    ("3.5.", ["3.5"] + ["4"] * 9, 0.3),                        # trailing period removed
    ("red", ["blue"] * 5 + ["green"] * 5, 0.0),
])
def test_vqa_accuracy_hand_computed(prediction, answers, expected):
    assert vqa_accuracy(prediction, answers) == pytest.approx(expected, abs=1e-12)


def test_duplicate_answer_dicts_follow_dict_inequality():
    # Official: "otherGTAns = [item for item in answers if item != gtAnsDatum]". Without answer_id
    # two identical dicts are removed together, so 2 matching "yes" dicts never see each other.
    with_ids = [{"answer": "yes", "answer_id": i} for i in (1, 2)] + [{"answer": "no", "answer_id": i} for i in range(3, 11)]
    no_ids = [{"answer": "yes"}] * 2 + [{"answer": "no", "answer_id": i} for i in range(3, 11)]
    assert vqa_accuracy("yes", with_ids) == pytest.approx(0.6)
    assert vqa_accuracy("yes", no_ids) == pytest.approx(8 * (2 / 3) / 10)


# ---------------------------------------------------------------------------------------------
# VQA: files

VQA_CASES = [
    # (qid, image, question_type, answer_type, answers, prediction, expected accuracy)
    (1001, 1, "what color", "other", ["black"] * 10, "black", 1.0),
    (1002, 1, "is it", "yes/no", ["yes"] * 9 + ["no"], "Yes.", 1.0),
    (2001, 2, "how many", "number", ["2", "2", "two"] + ["3"] * 7, "two", 0.9),
    (2002, 2, "is the", "yes/no", ["yes"] * 10, "Yes", 0.0),
    (3001, 3, "what is", "other", ["umbrella", "an umbrella"] + ["bag"] * 8, "the umbrella", 0.6),
    (3002, 3, "how many", "number", ["1"] + ["2"] * 9, "1", 0.3),
]


def vqa_files(tmp_path: Path, predictions=None):
    questions = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014",
                 "questions": [{"image_id": img, "question": "?", "question_id": qid} for qid, img, *_ in VQA_CASES]}
    annotations = {"info": {}, "annotations": [
        {"question_type": qt, "multiple_choice_answer": ans[0], "image_id": img, "answer_type": at, "question_id": qid,
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(ans)]}
        for qid, img, qt, at, ans, _, _ in VQA_CASES]}
    if predictions is None:
        predictions = [{"question_id": qid, "answer": pred} for qid, *_, pred, _ in VQA_CASES]
    paths = {}
    for name, data in (("questions", questions), ("annotations", annotations), ("predictions", predictions)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(data), encoding="utf-8")
    return paths


def test_score_vqa_overall_and_per_type(tmp_path):
    p = vqa_files(tmp_path)
    result = score_vqa(p["questions"], p["annotations"], p["predictions"])
    assert result["n_questions"] == 6 and result["n_annotated"] == 6 and result["n_missing"] == 0
    assert result["overall_unrounded"] == pytest.approx(100 * 3.8 / 6)
    assert result["overall"] == 63.33  # round(100 * mean, 2), as vqaEval
    assert result["per_answer_type"] == {"other": 80.0, "yes/no": 50.0, "number": 60.0}
    assert result["per_answer_type_count"] == {"other": 2, "yes/no": 2, "number": 2}
    assert result["per_question_type"] == {"what color": 100.0, "is it": 100.0, "how many": 60.0,
                                           "is the": 0.0, "what is": 60.0}
    assert result["per_question_type_count"]["how many"] == 2
    per_q = score_vqa(p["questions"], p["annotations"], p["predictions"], per_question=True)["per_question"]
    assert per_q == {str(qid): round(100 * exp, 2) for qid, *_, exp in VQA_CASES}


def test_missing_predictions_are_an_error_unless_allowed(tmp_path):
    preds = [{"question_id": qid, "answer": pred} for qid, *_, pred, _ in VQA_CASES[:4]]
    p = vqa_files(tmp_path, preds)
    with pytest.raises(EvaluationError, match=r"2 of 6 annotated questions have no prediction \(question ids 3001, 3002\)"):
        score_vqa(p["questions"], p["annotations"], p["predictions"])
    result = score_vqa(p["questions"], p["annotations"], p["predictions"], allow_missing=True)
    assert (result["n_questions"], result["n_missing"], result["missing_question_ids"]) == (4, 2, [3001, 3002])
    assert result["overall_unrounded"] == pytest.approx(100 * 2.9 / 4)


@pytest.mark.parametrize("predictions, message", [
    ([{"question_id": 1001, "answer": "a"}, {"question_id": 1001, "answer": "b"}], "more than one prediction"),
    ([{"question_id": 9999, "answer": "a"}], "not annotated"),
    ([{"question_id": "1001", "answer": "a"}], "question_id must be an integer"),
    ([{"question_id": 1001, "answer": 2}], "answer must be a string"),
    ({"1001": "a"}, "JSON list"),
])
def test_bad_predictions_are_errors(tmp_path, predictions, message):
    p = vqa_files(tmp_path, predictions)
    with pytest.raises(EvaluationError, match=message):
        score_vqa(p["questions"], p["annotations"], p["predictions"], allow_missing=True)


def test_questions_and_annotations_must_be_one_split(tmp_path):
    p = vqa_files(tmp_path)
    questions = json.loads(p["questions"].read_text())
    questions["questions"].append({"image_id": 9, "question": "?", "question_id": 9001})
    with pytest.raises(EvaluationError, match="1 questions have no annotation"):
        score_vqa(questions, p["annotations"], p["predictions"])
    questions["questions"] = questions["questions"][1:-1]
    with pytest.raises(EvaluationError, match="question 1001 is not in the questions file"):
        score_vqa(questions, p["annotations"], p["predictions"])
    with pytest.raises(SourceError, match="does not exist"):
        score_vqa(tmp_path / "nope.json", p["annotations"], p["predictions"])


# ---------------------------------------------------------------------------------------------
# CIDEr-D files (values: parity tests); here the file contract


def coco_files(tmp_path: Path, predictions):
    annotations = {"info": {}, "licenses": [], "images": [{"id": 11}, {"id": 12}, {"id": 13}], "annotations": [
        {"image_id": 11, "id": 1, "caption": "A man riding a horse on a beach."},
        {"image_id": 11, "id": 2, "caption": "A person rides a brown horse near the ocean"},
        {"image_id": 11, "id": 3, "caption": "Man on horseback (at the shore)."},
        {"image_id": 12, "id": 4, "caption": "Two cats sleeping on a red couch."},
        {"image_id": 12, "id": 5, "caption": "A pair of cats naps on the sofa!"},
        {"image_id": 13, "id": 6, "caption": "A plate of food with broccoli, rice and chicken."},
        {"image_id": 13, "id": 7, "caption": "Chicken and broccoli served over rice."},
        {"image_id": 13, "id": 8, "caption": "A healthy meal on a white plate"},
    ]}
    (tmp_path / "captions.json").write_text(json.dumps(annotations))
    (tmp_path / "results.json").write_text(json.dumps(predictions))
    return tmp_path / "captions.json", tmp_path / "results.json"


GOOD_CAPTIONS = [{"image_id": 11, "caption": "A man riding a horse on the beach."},
                 {"image_id": 12, "caption": "two cats on a couch"},
                 {"image_id": 13, "caption": "A plate of chicken, rice and broccoli."}]


def test_score_captions_contract(tmp_path):
    from emu.evaluate.cider import cider_d, score_captions
    from emu.evaluate.ptb import tokenize_captions

    ann, res = coco_files(tmp_path, GOOD_CAPTIONS)
    result = score_captions(ann, res, per_image=True)
    gts = {i: [a["caption"] for a in json.loads(ann.read_text())["annotations"] if a["image_id"] == i] for i in (11, 12, 13)}
    expected = cider_d(tokenize_captions(gts), tokenize_captions({p["image_id"]: [p["caption"]] for p in GOOD_CAPTIONS}))
    assert result["cider"] == pytest.approx(expected.score, abs=1e-12)
    assert result["cider_x100"] == pytest.approx(100 * expected.score)
    assert (result["n_images"], result["n_references"], result["n_missing"]) == (3, 8, 0)
    assert set(result["per_image"]) == {"11", "12", "13"} and result["per_image"]["11"] > result["per_image"]["12"] > 0

    ann, res = coco_files(tmp_path, GOOD_CAPTIONS[:2])
    with pytest.raises(EvaluationError, match=r"1 of 3 annotated images have no caption prediction \(image ids 13\)"):
        score_captions(ann, res)
    partial = score_captions(ann, res, allow_missing=True)
    assert (partial["n_images"], partial["n_missing"], partial["missing_image_ids"]) == (2, 1, [13])
    for bad, message in ((GOOD_CAPTIONS + [GOOD_CAPTIONS[0]], "more than one caption prediction"),
                         (GOOD_CAPTIONS + [{"image_id": 99, "caption": "x"}], "without reference captions"),
                         ([{"image_id": 11, "caption": None}], "caption must be a string")):
        ann, res = coco_files(tmp_path, bad)
        with pytest.raises(EvaluationError, match=message):
            score_captions(ann, res, allow_missing=True)


def test_cider_d_rejects_malformed_input():
    from emu.evaluate.cider import cider_d

    with pytest.raises(EvaluationError, match="same images"):
        cider_d({1: ["a b"]}, {2: ["a b"]})
    with pytest.raises(EvaluationError, match="exactly 1"):
        cider_d({1: ["a b"]}, {1: ["a b", "c d"]})
    with pytest.raises(EvaluationError, match="non-empty list of references"):
        cider_d({1: []}, {1: ["a b"]})


def test_ptb_fast_path_changes_nothing():
    """The plain-word shortcut in the lexer gives the same tokens as trying every rule."""
    from emu.evaluate.ptb import tokenize_lines

    rng = np.random.default_rng(0)
    pieces = ("a man the Dog cannot gonna etc. U.S. St. Mr. don't it's 3.5 1,000 ( ) \" ' , . ! ? -- ... "
              "x-ray www.a.com me@x.org :) c++ 3 1/2 café The A").split(" ")
    lines = [" ".join(rng.choice(pieces, size=rng.integers(1, 12))) for _ in range(300)]
    assert tokenize_lines(lines) == tokenize_lines(lines, fast_path=False)


@pytest.mark.parametrize("caption, expected", [
    ("A man riding a horse.", "a man riding a horse"),
    ("Two dogs (brown) play, don't they?", "two dogs -lrb- brown -rrb- play do n't they"),  # -lrb- survives
    ("It's 3 1/2 ft tall!", "it 's 3\xa01/2 ft tall"),
    ("He cannot go... now", "he can not go now"),
    ("\"Hello\" she said", "hello she said"),
    ("A cat 😀 on a mat", "a cat on a mat"),
])
def test_ptb_tokenize_examples(caption, expected):
    from emu.evaluate.ptb import ptb_tokenize

    assert ptb_tokenize(caption) == expected


# ---------------------------------------------------------------------------------------------
# Exact match, CLIP, FID


def test_exact_match_normalisation():
    assert normalize_em("  A  Dog\tRuns \n") == "a dog runs"
    result = exact_match(["Yes", " a  dog", "a dog.", "two"], ["yes", "A dog", "a dog", ["2", "Two"]])
    assert result == {"accuracy": 75.0, "correct": 3, "n": 4}
    with pytest.raises(EvaluationError, match="one reference per prediction"):
        exact_match(["a"], [])


def test_clip_scores_are_mean_cosines():
    import torch

    image = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    text = torch.tensor([[2.0, 0.0], [1.0, 1.0], [-3.0, -4.0]])
    result = clip_t(image, text)
    assert result["n"] == 3
    assert result["mean"] == pytest.approx((1.0 + 1 / math.sqrt(2) - 1.0) / 3, abs=1e-12)
    assert clip_i(np.eye(3), np.eye(3))["mean"] == pytest.approx(1.0)
    with pytest.raises(EvaluationError, match="zero vectors"):
        clip_t(np.zeros((1, 4)), np.ones((1, 4)))
    with pytest.raises(EvaluationError, match="same shape"):
        clip_i(np.ones((2, 4)), np.ones((3, 4)))


def _fid_numpy(x: np.ndarray, y: np.ndarray) -> float:
    """Independent FID: Tr((S1 S2)^1/2) as the trace of the PSD root of S1^1/2 S2 S1^1/2 (eigh)."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


@pytest.mark.parametrize("seed, n, d, shift", [(0, 200, 8, 0.0), (1, 500, 16, 0.5), (2, 100, 32, 2.0)])
def test_fid_parity_with_direct_numpy(seed, n, d, shift):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = rng.normal(size=(n + 17, d)) @ rng.normal(scale=0.5, size=(d, d)) + shift
    assert fid_from_features(x, y) == pytest.approx(_fid_numpy(x, y), rel=1e-9, abs=1e-9)


def test_fid_known_values():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 12))
    assert abs(fid_from_features(x, x)) < 1e-9                      # identical sets
    assert fid_from_features(x, x + 1.5) == pytest.approx(12 * 1.5 ** 2, rel=1e-9)  # pure shift
    # 1-D Gaussians: (mu1 - mu2)^2 + (s1 - s2)^2
    assert frechet_distance(1.0, 4.0, 3.0, 9.0) == pytest.approx(4 + 1)
    # diagonal covariances: sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    assert frechet_distance(np.zeros(3), np.diag(a), np.zeros(3), np.diag(b)) == pytest.approx(1 + 0 + 4)
    mu, sigma = gaussian_statistics(x)
    assert np.allclose(sigma, np.cov(x.T)) and np.allclose(mu, x.mean(0))
    # singular covariances (fewer samples than dimensions): finite and ~0 for equal sets (sqrtm of
    # a rank-9 product is only accurate to ~1e-6 here, in the reference implementation too)
    small = rng.normal(size=(10, 64))
    assert abs(fid_from_features(small, small)) < 1e-4
    with pytest.raises(EvaluationError, match="at least 2"):
        fid_from_features(x[:1], x)
    with pytest.raises(EvaluationError, match="different lengths"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


# ---------------------------------------------------------------------------------------------
# Gate


def test_gate_directions_tolerance_and_missing():
    baseline = {"metrics": {"vqav2_overall": {"threshold": 65.0, "direction": "higher", "tolerance": 0.5},
                            "fid": {"threshold": 12.0, "direction": "lower"},
                            "coco_captions_cider": {"threshold": 1.1}}}
    ok = check_gate({"vqav2_overall": 64.5, "fid": 12.0, "coco_captions_cider": 1.1, "extra": 0.0}, baseline)
    assert ok.passed and ok.reasons == [] and len(ok.checks) == 3
    bad = check_gate({"vqav2": {"overall": 64.49}, "fid": 12.01}, baseline)  # nested names flattened
    assert not bad.passed and len(bad.reasons) == 3
    assert bad.reasons[0].startswith("vqav2_overall = 64.49; needs >= 64.5")
    assert bad.reasons[1].startswith("fid = 12.01; needs <= 12")
    assert bad.reasons[2].startswith("coco_captions_cider: missing")
    assert not check_gate({"vqav2_overall": float("nan"), "fid": 1.0, "coco_captions_cider": 2.0}, baseline).passed
    assert "gate FAILED (3 of 3 metrics)" in bad.summary_lines()[0]


def test_gate_files_and_bad_settings(tmp_path):
    (tmp_path / "gate.yaml").write_text("metrics:\n  fid: {threshold: 10, direction: lower, tolerance: 1}\n")
    (tmp_path / "gate.json").write_text(json.dumps({"metrics": {"fid": {"threshold": 10, "direction": "lower"}}}))
    assert load_gate(tmp_path / "gate.yaml").metrics["fid"].bound == 11.0
    assert check_gate({"fid": 10.5}, tmp_path / "gate.yaml").passed
    assert not check_gate({"fid": 10.5}, tmp_path / "gate.json").passed
    for spec, message in (({"threshold": 1, "direction": "up"}, "direction"),
                          ({"threshold": 1, "tolerance": -1}, "tolerance"),
                          ({"threshold": "x"}, "threshold"),
                          ({"direction": "lower"}, "threshold is required"),
                          ({"threshold": 1, "bogus": 2}, "unknown setting 'bogus'")):
        with pytest.raises(ConfigError, match=message):
            GateConfig.from_dict({"metrics": {"m": spec}})
    with pytest.raises(ConfigError, match="at least one metric"):
        GateConfig.from_dict({"metrics": {}})


# ---------------------------------------------------------------------------------------------
# Reports

KFP_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def test_kfp_metrics_names_and_values(tmp_path):
    p = vqa_files(tmp_path)
    result = score_vqa(p["questions"], p["annotations"], p["predictions"], per_question=True)
    flat = kfp_metrics(result, "vqav2")
    assert flat["vqav2_overall"] == 63.33 and flat["vqav2_per_answer_type_yes_no"] == 50.0
    assert flat["vqav2_n_questions"] == 6.0 and not any("per_question_" in k and k[-1].isdigit() for k in flat)
    assert all(KFP_NAME.match(k) and isinstance(v, float) for k, v in flat.items())
    assert KFP_NAME.match(metric_name("x" * 100)) and metric_name("1st", "A/B") == "m_1st_a_b"
    with pytest.raises(EmuError, match="both map"):
        kfp_metrics({"a b": 1, "a_b": 2})
    with pytest.raises(EmuError, match="not finite"):
        kfp_metrics({"fid": float("nan")})

    out = write_metrics_json(tmp_path / "m.json", result, prefix="vqav2", inputs={"predictions": "p.json"})
    saved = json.loads(out.read_text())
    assert saved["metrics"] == flat and saved["result"]["overall"] == 63.33 and saved["inputs"]["predictions"] == "p.json"
    with pytest.raises(EmuError, match="already exists"):
        write_metrics_json(out, result)
    write_metrics_json(out, {"x": 1}, overwrite=True)
    assert json.loads(out.read_text())["metrics"] == {"x": 1.0}


def _png() -> bytes:
    from PIL import Image
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (4, 3), (255, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_markdown_and_html_reports_include_images(tmp_path):
    png = _png()
    outside = tmp_path / "elsewhere" / "sample.png"
    outside.parent.mkdir()
    outside.write_bytes(png)
    sections = [Section("VQAv2", "Scores | with a pipe.", [Table(["type", "acc"], [["yes/no", 83.21], ["other", None]])],
                        [Figure(png, "from bytes"), Figure(outside, "from a file <b>")])]
    md = write_markdown_report(tmp_path / "report" / "report.md", "Eval <run>", sections)
    text = md.read_text()
    assert "| type | acc |" in text and "| yes/no | 83.2100 |" in text and "| other |  |" in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links == ["report_files/figure_1.png", "report_files/figure_2.png"]
    assert all((md.parent / link).read_bytes() == png for link in links)

    page = write_html_report(tmp_path / "report.html", "Eval <run>", sections).read_text()
    assert "<title>Eval &lt;run&gt;</title>" in page and "from a file &lt;b&gt;" in page
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2 and all(base64.b64decode(i) == png for i in images)
    with pytest.raises(EmuError, match="already exists"):
        write_html_report(tmp_path / "report.html", "x", [])
    with pytest.raises(EmuError, match="not PNG"):
        write_html_report(tmp_path / "r2.html", "x", [Section("s", figures=[Figure(b"not an image")])])


# ---------------------------------------------------------------------------------------------
# CLI end to end


def run_emu(*args, cwd):
    return subprocess.run([str(EMU), *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_cli_score_vqav2(tmp_path):
    p = vqa_files(tmp_path)
    proc = run_emu("evaluate", "score", "--bench", "vqav2", "--questions", p["questions"], "--annotations",
                   p["annotations"], "--predictions", p["predictions"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "vqav2: 63.33 VQA accuracy over 6 questions" in proc.stdout
    assert re.search(r"yes/no\s+50\.00\s+2", proc.stdout) and re.search(r"how many\s+60\.00\s+2", proc.stdout)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["metrics"]["vqav2_overall"] == 63.33 and saved["result"]["n_questions"] == 6
    assert len(saved["inputs"]["predictions"]["sha256"]) == 64

    again = run_emu("evaluate", "score", "--bench", "vqav2", "--questions", p["questions"], "--annotations",
                    p["annotations"], "--predictions", p["predictions"], cwd=tmp_path)
    assert again.returncode == 2 and "already exists; pass --force" in again.stderr
    forced = run_emu("evaluate", "score", "--bench", "vqav2", "--questions", p["questions"], "--annotations",
                     p["annotations"], "--predictions", p["predictions"], "--force", cwd=tmp_path)
    assert forced.returncode == 0 and "replaced metrics.json" in forced.stdout


def test_cli_score_vqav2_missing_predictions_exit_2(tmp_path):
    p = vqa_files(tmp_path, [{"question_id": 1001, "answer": "black"}])
    proc = run_emu("evaluate", "score", "--bench", "vqav2", "--questions", p["questions"], "--annotations",
                   p["annotations"], "--predictions", p["predictions"], "--out", tmp_path / "m.json", cwd=tmp_path)
    assert proc.returncode == 2 and "5 of 6 annotated questions have no prediction" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "m.json").exists()
    partial = run_emu("evaluate", "score", "--bench", "vqav2", "--questions", p["questions"], "--annotations",
                      p["annotations"], "--predictions", p["predictions"], "--out", tmp_path / "m.json",
                      "--allow-missing", cwd=tmp_path)
    assert partial.returncode == 0 and "over 1 questions" in partial.stdout and "NOT scored: 5 of 6" in partial.stdout


def test_cli_score_coco_captions(tmp_path):
    from emu.evaluate.cider import score_captions

    ann, res = coco_files(tmp_path, GOOD_CAPTIONS)
    proc = run_emu("evaluate", "score", "--bench", "coco-captions", "--annotations", ann, "--predictions", res,
                   "--out", tmp_path / "out" / "captions.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    expected = score_captions(ann, res)["cider"]
    assert f"CIDEr-D {expected:.4f}" in proc.stdout and "over 3 images, 8 reference captions" in proc.stdout
    saved = json.loads((tmp_path / "out" / "captions.json").read_text())
    assert saved["metrics"]["coco_captions_cider"] == pytest.approx(expected, abs=1e-12)

    for args, message in ((["--bench", "nope"], "unknown --bench 'nope'"),
                          (["--bench", "coco-captions", "--questions", ann], "only for --bench vqav2")):
        bad = run_emu("evaluate", "score", *args, "--annotations", ann, "--predictions", res,
                      "--out", tmp_path / "x.json", cwd=tmp_path)
        assert bad.returncode == 2 and message in bad.stderr


def test_cli_evaluate_harness_form(tmp_path):
    proc = run_emu("evaluate", "--model", "m", cwd=tmp_path)
    assert proc.returncode == 2 and "needs --out" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_emu("evaluate", "--model", str(tmp_path / "missing"), "--bench", "vqav2", "--out", tmp_path / "o",
                   "--data", tmp_path, cwd=tmp_path)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    assert run_emu("evaluate", cwd=tmp_path).stdout.count("score") >= 1
