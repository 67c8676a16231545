"""The official VQAv2 accuracy, reproduced exactly.

Source: GT-Vision-Lab/VQA `PythonEvaluationTools/vqaEvaluation/vqaEval.py`, master (commit
a013f0043c1e...; ../notes/formats.md §9). Tables and functions are ported line by line, quirks
included; the quoted official lines are in the comments. What matters for the numbers:

- answers get `.replace('\\n', ' ').replace('\\t', ' ').strip()` (GT and prediction);
- normalisation (punctuation, then digits/articles/contractions) is applied ONLY when the 10 GT
  answers of a question disagree, to the GT answers and the prediction alike. When all annotators
  agree nothing is normalised, not even case: "Yes." scores 0 against ten "yes". A maintainer
  explains it in GT-Vision-Lab/VQA issue #14 ("if all the human annotators agree, don't do any
  post-processing ... to not preprocess answers to questions requiring OCR");
- leave-one-out accuracy: for each GT answer, min(1, #matches among the OTHER nine / 3), averaged
  over the 10; m matching answers give 0, 0.3, 0.6, 0.9, 1.0 for m = 0, 1, 2, 3, >= 4;
- overall and per-type numbers are `round(100 * mean, 2)` (Python's round, as the official code);
  the unrounded means are reported next to them.

Older copies differ (an earlier vqaEval always normalised the prediction; open_flamingo's
vqa_metric.py always normalises both); for published VQAv2 numbers the master behaviour is it.

Unlike the official tools this never scores a subset silently: every annotated question needs a
prediction unless `allow_missing` is set, and the number scored is always reported (the official
Emu evaluation code scored 1/1000 of VQAv2 without saying so).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

from emu.evaluate import EvaluationError
from emu.evaluate._io import JsonInput, describe, id_sample, load_json, require_int, require_str

__all__ = ["ARTICLES", "CONTRACTIONS", "MANUAL_MAP", "PUNCT", "process_digit_article",
           "process_punctuation", "score_vqa", "vqa_accuracy"]

# ---- vqaEval.py __init__, verbatim ----------------------------------------------------------
# self.contractions = {...}: maps apostrophe-less forms to the apostrophe forms (some entries are
# odd, e.g. "somebody'd": "somebodyd"; kept as they are).
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've",
    "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've",
    "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
# self.manualMap: number words to digits; note 'none' -> '0'.
MANUAL_MAP: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
# self.articles = ['a', 'an', 'the']
ARTICLES: tuple[str, ...] = ("a", "an", "the")
# self.periodStrip = re.compile("(?!<=\d)(\.)(?!\d)")
# QUIRK: "(?!<=\d)" was meant as a lookbehind but is a negative LOOKAHEAD for the text "<=" plus
# a digit, which never follows the "." it guards; the pattern removes every "." not followed by
# a digit ("3.5" keeps its point, "3." and "a.b" lose theirs).
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
# self.commaStrip = re.compile("(\d)(\,)(\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
# self.punct = [';', r"/", '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<',
#               '@', '`', ',', '?', '!']   (no apostrophe, no colon, no period)
PUNCT: tuple[str, ...] = (";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
                          ">", "<", "@", "`", ",", "?", "!")
# periodStrip.sub("", outText, re.UNICODE): QUIRK, re.UNICODE (== 32) lands in the positional
# `count` parameter, so at most 32 periods are removed.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def process_punctuation(in_text: str) -> str:
    """vqaEval.processPunctuation, verbatim:

        outText = inText
        for p in self.punct:
            if (p + ' ' in inText or ' ' + p in inText) or (re.search(self.commaStrip, inText) != None):
                outText = outText.replace(p, '')
            else:
                outText = outText.replace(p, ' ')
        outText = self.periodStrip.sub("", outText, re.UNICODE)
        return outText

    QUIRK: the tests look at the ORIGINAL text; if it holds any digit,digit ("1,000") every punct
    character is deleted rather than replaced by a space.
    """
    out_text = in_text
    has_digit_comma = re.search(COMMA_STRIP, in_text) is not None  # same test every iteration
    for p in PUNCT:
        if (p + " " in in_text or " " + p in in_text) or has_digit_comma:
            out_text = out_text.replace(p, "")
        else:
            out_text = out_text.replace(p, " ")
    return PERIOD_STRIP.sub("", out_text, count=_PERIOD_STRIP_COUNT)


def process_digit_article(in_text: str) -> str:
    """vqaEval.processDigitArticle, verbatim:

        outText = []
        tempText = inText.lower().split()
        for word in tempText:
            word = self.manualMap.setdefault(word, word)
            if word not in self.articles:
                outText.append(word)
        for wordId, word in enumerate(outText):
            if word in self.contractions:
                outText[wordId] = self.contractions[word]
        outText = ' '.join(outText)

    (`setdefault` also inserts unknown words into manualMap, mapping to themselves; `get` gives the
    same output without that side effect.)
    """
    out_text = []
    for word in in_text.lower().split():
        word = MANUAL_MAP.get(word, word)
        if word not in ARTICLES:
            out_text.append(word)
    for word_id, word in enumerate(out_text):
        if word in CONTRACTIONS:
            out_text[word_id] = CONTRACTIONS[word]
    return " ".join(out_text)


def _clean(text: str) -> str:
    # ansDic['answer'].replace('\n', ' ').replace('\t', ' ').strip(); the same for resAns.
    return text.replace("\n", " ").replace("\t", " ").strip()


@functools.lru_cache(maxsize=1 << 16)
def _normalize(text: str) -> str:
    """processPunctuation then processDigitArticle (pure functions of the text: cached)."""
    return process_digit_article(process_punctuation(text))


def _question_accuracy(res_ans: str, answers: Sequence[Mapping[str, Any]]) -> float:
    r"""avgGTAcc of one question (the body of vqaEval.evaluate's loop, master):

        for ansDic in gts[quesId]['answers']:
            ansDic['answer'] = ansDic['answer'].replace('\n', ' ').replace('\t', ' ').strip()
        resAns = res[quesId]['answer'].replace('\n', ' ').replace('\t', ' ').strip()
        gtAcc = []
        gtAnswers = [ans['answer'] for ans in gts[quesId]['answers']]
        if len(set(gtAnswers)) > 1:
            for ansDic in gts[quesId]['answers']:
                ansDic['answer'] = self.processPunctuation(ansDic['answer'])
                ansDic['answer'] = self.processDigitArticle(ansDic['answer'])
            resAns = self.processPunctuation(resAns)
            resAns = self.processDigitArticle(resAns)
        for gtAnsDatum in gts[quesId]['answers']:
            otherGTAns = [item for item in gts[quesId]['answers'] if item != gtAnsDatum]
            matchingAns = [item for item in otherGTAns if item['answer'] == resAns]
            acc = min(1, float(len(matchingAns)) / 3)
            gtAcc.append(acc)
        avgGTAcc = float(sum(gtAcc)) / len(gtAcc)

    The "others" of an answer are the answers whose whole dict differs from it. In the official
    files every dict has its own answer_id, so exactly one is left out: then the count is the
    matches minus the answer itself. Without distinct ids the literal comparison runs (identical
    dicts are then left out together, as in the official code). The caller's dicts are never
    modified.
    """
    gt_answers = [_clean(a["answer"]) for a in answers]
    res = _clean(res_ans)
    if len(set(gt_answers)) > 1:
        gt_answers = [_normalize(a) for a in gt_answers]
        res = _normalize(res)
    matches = [a == res for a in gt_answers]
    ids = [a.get("answer_id") for a in answers]
    gt_acc = []
    if None not in ids and all(isinstance(i, (int, str)) for i in ids) and len(set(ids)) == len(ids):
        m = sum(matches)
        for is_match in matches:
            gt_acc.append(min(1, float(m - is_match) / 3))
    else:
        dicts = [{**a, "answer": text} for a, text in zip(answers, gt_answers)]
        for datum in dicts:
            matching = [item for item in dicts if item != datum and item["answer"] == res]
            gt_acc.append(min(1, float(len(matching)) / 3))
    return float(sum(gt_acc)) / len(gt_acc)


def vqa_accuracy(prediction: str, answers: Sequence[str] | Sequence[Mapping[str, Any]]) -> float:
    """The official accuracy in [0, 1] of one predicted answer against a question's GT answers
    (strings, each one annotator, or the annotation's answer dicts)."""
    if not answers:
        raise EvaluationError("a VQA question needs at least one ground-truth answer")
    dicts = [a if isinstance(a, Mapping) else {"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)]
    return _question_accuracy(prediction, dicts)


def score_vqa(questions_json: JsonInput, annotations_json: JsonInput, predictions: JsonInput, *,
              allow_missing: bool = False, per_question: bool = False, precision: int = 2) -> dict[str, Any]:
    """Score VQAv2-format predictions with the official accuracy.

    `questions_json` / `annotations_json`: the VQAv2 questions and annotations files (paths or
    parsed objects); every annotated question must be in the questions file. `predictions`: the
    VQAv2 results format `[{"question_id": int, "answer": str}, ...]`.

    Every annotated question must have exactly one prediction: a missing one is an
    EvaluationError unless `allow_missing` (then only predicted questions are scored and those
    left out are counted and listed); duplicates and unknown question ids are always errors.

    Returns overall, per answer type and per question type accuracy in percent, rounded to
    `precision` decimals as vqaEval does (`round(100 * mean, 2)`), each with its unrounded value
    and question count, and `n_questions` (scored), `n_annotated`, `n_missing`.
    """
    questions = load_json(questions_json, "VQA questions")
    annotations = load_json(annotations_json, "VQA annotations")
    results = load_json(predictions, "VQA predictions")
    anns = _annotations(annotations, questions, describe(annotations_json), describe(questions_json))
    preds = _predictions(results, anns, describe(predictions))

    missing = [qid for qid in anns if qid not in preds]
    if missing and not allow_missing:
        raise EvaluationError(
            f"{len(missing)} of {len(anns)} annotated questions have no prediction (question ids "
            f"{id_sample(missing)}); predict every question or pass allow_missing (--allow-missing) "
            f"to score only the {len(preds)} predicted ones")
    if not preds:
        raise EvaluationError("no VQA predictions to score")

    acc_qa: list[float] = []
    acc_ques_type: dict[str, list[float]] = {}
    acc_ans_type: dict[str, list[float]] = {}
    eval_qa: dict[int, float] = {}
    for qid, ann in anns.items():  # vqa.getQuesIds(): annotation-file order
        if qid not in preds:
            continue
        avg_gt_acc = _question_accuracy(preds[qid], ann["answers"])
        acc_qa.append(avg_gt_acc)
        acc_ques_type.setdefault(ann["question_type"], []).append(avg_gt_acc)
        acc_ans_type.setdefault(ann["answer_type"], []).append(avg_gt_acc)
        eval_qa[qid] = round(100 * avg_gt_acc, precision)  # setEvalQA

    def percent(values: list[float]) -> float:
        # setAccuracy: round(100*float(sum(accQA))/len(accQA), self.n)
        return 100 * float(sum(values)) / len(values)

    out: dict[str, Any] = {
        "bench": "vqav2",
        "metric": "VQA accuracy (official vqaEval.py: normalise only when annotators disagree, "
                  "leave-one-out min(1, matches/3))",
        "overall": round(percent(acc_qa), precision),
        "overall_unrounded": percent(acc_qa),
        "per_answer_type": {t: round(percent(v), precision) for t, v in acc_ans_type.items()},
        "per_answer_type_unrounded": {t: percent(v) for t, v in acc_ans_type.items()},
        "per_answer_type_count": {t: len(v) for t, v in acc_ans_type.items()},
        "per_question_type": {t: round(percent(v), precision) for t, v in acc_ques_type.items()},
        "per_question_type_unrounded": {t: percent(v) for t, v in acc_ques_type.items()},
        "per_question_type_count": {t: len(v) for t, v in acc_ques_type.items()},
        "n_questions": len(acc_qa),
        "n_annotated": len(anns),
        "n_missing": len(missing),
    }
    if missing:
        out["missing_question_ids"] = missing
    if per_question:
        out["per_question"] = {str(qid): acc for qid, acc in eval_qa.items()}
    return out


def _annotations(annotations: Any, questions: Any, ann_source: str, q_source: str) -> dict[int, dict[str, Any]]:
    """Annotations by question id, in file order, each checked for what the scorer reads."""
    if not isinstance(annotations, Mapping) or not isinstance(annotations.get("annotations"), list):
        raise EvaluationError(f"{ann_source}: a VQA annotations file is an object with an \"annotations\" list")
    if not isinstance(questions, Mapping) or not isinstance(questions.get("questions"), list):
        raise EvaluationError(f"{q_source}: a VQA questions file is an object with a \"questions\" list")
    question_images: dict[int, Any] = {}
    for i, q in enumerate(questions["questions"]):
        if not isinstance(q, Mapping):
            raise EvaluationError(f"{q_source}: questions[{i}] must be an object")
        question_images[require_int(q.get("question_id"), f"{q_source}: questions[{i}].question_id")] = q.get("image_id")
    anns: dict[int, dict[str, Any]] = {}
    for i, ann in enumerate(annotations["annotations"]):
        where = f"{ann_source}: annotations[{i}]"
        if not isinstance(ann, Mapping):
            raise EvaluationError(f"{where} must be an object")
        qid = require_int(ann.get("question_id"), f"{where}.question_id")
        if qid in anns:
            raise EvaluationError(f"{where}: question {qid} is annotated twice")
        answers = ann.get("answers")
        if not isinstance(answers, list) or not answers:
            raise EvaluationError(f"{where} (question {qid}): \"answers\" must be a non-empty list")
        for j, a in enumerate(answers):
            if not isinstance(a, Mapping):
                raise EvaluationError(f"{where}.answers[{j}] must be an object with an \"answer\"")
            require_str(a.get("answer"), f"{where}.answers[{j}].answer")
        require_str(ann.get("question_type"), f"{where}.question_type")
        require_str(ann.get("answer_type"), f"{where}.answer_type")
        if qid not in question_images:
            raise EvaluationError(f"{where}: question {qid} is not in the questions file {q_source} "
                                  f"(are the questions and annotations of the same split?)")
        image = question_images[qid]
        if image is not None and ann.get("image_id") is not None and image != ann["image_id"]:
            raise EvaluationError(f"{where}: question {qid} is about image {ann['image_id']} in the "
                                  f"annotations but image {image} in the questions file")
        anns[qid] = dict(ann)
    unannotated = [qid for qid in question_images if qid not in anns]
    if unannotated:
        raise EvaluationError(f"{q_source}: {len(unannotated)} questions have no annotation (question ids "
                              f"{id_sample(unannotated)}); test-dev/test questions are scored by the "
                              f"evaluation server, not locally")
    if not anns:
        raise EvaluationError(f"{ann_source}: no annotations")
    return anns


def _predictions(results: Any, anns: Mapping[int, Any], source: str) -> dict[int, str]:
    if not isinstance(results, list):
        raise EvaluationError(f"{source}: VQA predictions are a JSON list of "
                              f"{{\"question_id\": int, \"answer\": str}}, got {type(results).__name__}")
    preds: dict[int, str] = {}
    duplicates: list[int] = []
    unknown: list[int] = []
    for i, row in enumerate(results):
        if not isinstance(row, Mapping):
            raise EvaluationError(f"{source}: predictions[{i}] must be an object with question_id and answer")
        qid = require_int(row.get("question_id"), f"{source}: predictions[{i}].question_id")
        answer = require_str(row.get("answer"), f"{source}: predictions[{i}].answer")
        if qid in preds:
            duplicates.append(qid)
        elif qid not in anns:
            # VQA.loadRes: "Results do not correspond to current VQA set."
            unknown.append(qid)
        preds[qid] = answer
    if duplicates:
        raise EvaluationError(f"{source}: {len(duplicates)} questions have more than one prediction "
                              f"(question ids {id_sample(duplicates)})")
    if unknown:
        raise EvaluationError(f"{source}: {len(unknown)} predictions are for questions that are not "
                              f"annotated (question ids {id_sample(unknown)})")
    return preds
