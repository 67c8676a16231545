"""Parity of emu.evaluate with the reference implementations.

- CIDEr-D: pycocoevalcap 1.2 `Cider` (the COCO server's CIDEr-D) on the same tokenised input.
- Tokenisation: pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1 jar, needs `java`).
- VQA: a verbatim copy of the official vqaEval.py master loop, on random tricky answers.
"""

from __future__ import annotations

import inspect
import json
import random
import re
import shutil

import pytest

from emu.evaluate.cider import cider_d, score_captions
from emu.evaluate.ptb import PUNCTUATIONS, tokenize_captions
from emu.evaluate.vqa import ARTICLES, CONTRACTIONS, MANUAL_MAP, PUNCT, score_vqa, vqa_accuracy

pycocoevalcap = pytest.importorskip("pycocoevalcap", reason="parity reference: pip install pycocoevalcap==1.2")
from pycocoevalcap.cider.cider import Cider  # noqa: E402
from pycocoevalcap.cider.cider_scorer import CiderScorer  # noqa: E402

needs_java = pytest.mark.skipif(shutil.which("java") is None,
                                reason="pycocoevalcap's PTBTokenizer runs Stanford CoreNLP on `java`, not found")


# ---------------------------------------------------------------------------------------------
# CIDEr-D


def test_pycocoevalcap_cider_is_cider_d():
    """What makes it CIDEr-D, read from the reference's source: clipped weights, the Gaussian
    length penalty, sigma 6, x10, and document frequency over the scored images' references."""
    source = inspect.getsource(CiderScorer)
    assert "min(vec_hyp[n][ngram], vec_ref[n][ngram]) * vec_ref[n][ngram]" in source
    assert "np.e**(-(delta**2)/(2*self.sigma**2))" in source
    assert "score_avg *= 10.0" in source
    assert "self.ref_len = np.log(float(len(self.crefs)))" in source
    assert inspect.signature(Cider).parameters["sigma"].default == 6.0
    assert inspect.signature(Cider).parameters["n"].default == 4
    import pycocoevalcap.tokenizer.ptbtokenizer as ptb_module
    assert tuple(ptb_module.PUNCTUATIONS) == PUNCTUATIONS


CIDER_CASES = {
    "repeated words": ({1: ["a dog runs on the grass", "the dog is running", "a brown dog running in a field"],
                        2: ["a cat sleeps", "the cat is asleep on a bed"]},
                       {1: ["dog dog dog dog dog dog"], 2: ["a cat a cat a cat sleeps"]}),
    "longer and shorter candidates": ({1: ["a man riding a horse", "a person on a horse"],
                                       2: ["two people walking down a long sandy beach at sunset near the ocean"],
                                       3: ["a red bus"]},
                                      {1: ["a man riding a brown horse across a wide open field on a sunny afternoon"],
                                       2: ["people"], 3: ["a red double decker bus parked on the side of a city street"]}),
    "words absent from references": ({1: ["a plate of food", "food on a plate"], 2: ["a bowl of soup", "hot soup"]},
                                     {1: ["zebra giraffe elephant"], 2: ["a bowl of quantum chromodynamics"]}),
    "punctuation tokens kept by the tokenizer": ({1: ["a dog -lrb- brown -rrb- plays", "it 's a dog", "dog ?! yes"],
                                                  2: ["3\xa01/2 cups of flour", "flour & sugar"]},
                                                 {1: ["a dog -lrb- brown -rrb- it 's"], 2: ["3\xa01/2 cups & sugar"]}),
    "shared n-grams across images": ({i: [f"a man riding a {animal}", f"a man on a {animal}", "a man outside"]
                                      for i, animal in enumerate(["horse", "bike", "camel", "horse", "boat"])},
                                     {i: [c] for i, c in enumerate(["a man riding a horse", "a man riding a horse",
                                                                    "a man on a camel", "a man outside", "a boat"])}),
    "single image": ({7: ["a cat on a mat", "the cat sat on the mat"]}, {7: ["a cat on a mat"]}),
    "empty and one-word candidates (bigram length)": ({1: ["a dog", "dog"], 2: ["cat"], 3: ["a bird flying"]},
                                                      {1: [""], 2: ["cat"], 3: ["bird"]}),
    "identical candidate and references": ({1: ["a b c d e", "a b c d e"], 2: ["f g h", "f g h i"]},
                                           {1: ["a b c d e"], 2: ["f g h"]}),
    "different numbers of references": ({1: ["x y z"], 2: ["x y", "y z", "x z", "x y z w", "w"]},
                                        {1: ["x y z"], 2: ["x y z"]}),
}


@pytest.mark.parametrize("case", list(CIDER_CASES))
def test_cider_d_equals_pycocoevalcap(case):
    gts, res = CIDER_CASES[case]
    ref_score, ref_scores = Cider().compute_score(gts, res)
    ours = cider_d(gts, res)
    assert ours.score == pytest.approx(float(ref_score), abs=1e-9)
    assert list(ours.per_image.values()) == pytest.approx([float(s) for s in ref_scores], abs=1e-9)


def test_cider_d_equals_pycocoevalcap_on_a_random_corpus():
    rng = random.Random(0)
    vocab = "a an the man woman dog cat horse bike red blue big small on in near riding sitting with of".split()
    def sentence():
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 14)))
    gts = {i: [sentence() for _ in range(rng.randint(1, 6))] for i in range(60)}
    res = {i: [sentence()] for i in gts}
    ref_score, ref_scores = Cider().compute_score(gts, res)
    ours = cider_d(gts, res)
    assert ours.score == pytest.approx(float(ref_score), abs=1e-9)
    assert list(ours.per_image.values()) == pytest.approx([float(s) for s in ref_scores], abs=1e-9)


# ---------------------------------------------------------------------------------------------
# PTBTokenizer

TOKENIZER_SENTENCES = [
    "A man riding a horse on a beach.", "Two dogs (one brown) play in the snow!", "It's a dog's life; they're here.",
    "don't won't can't shouldn't ain't DON'T", '"Hello," she said. \'Hi\' there.', "“curly” ‘quotes’ and don’t",
    "a 1/2 inch, ½ cup, 3 1/2 miles, 5:30, 10,000 people, .5 and 3.14.", "a/b and/or 50/50 24/7 www.google.com",
    "A cat :) smiling ;-) ... and .... and . . . end", "@user #hashtag $100 £5 €3 ¢ 100% a&b AT&T R&D &amp;",
    "c++ c# Yahoo! what?! wow!!! no?", "gotta wanna lemme gimme 'twas cannot Cannot gonna", "'90s rock'n'roll o'clock y'all",
    "St. Louis is a city. Dr. Who at 5 p.m. Jan. 5", "the U.S. The dog", "apples etc.", "A big dog", "apples etc.", "a man",
    "a  man    riding   a horse.", "x-ray e-mail co-worker well-known T-shirt 3-D 2-year-old", "(555) 123-4567 call",
    "photo.jpg. a file.x, <b> bold </b> a < b > c", "café naïve Zürich 東京 Ελλάδα", "A cat 😀 on a mat 👍🏽",
    "", "   ", "A... B", "She said -- loudly --- and --- left", "e.g. i.e. vs. Mr. Mrs. Mt. Everest",
]


def _fuzz_sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    base = ("a an the man woman dog cat A The Two is on top of table with red near water I U S Mr Dr St etc Inc "
            "Co Ltd Jan No Fig ca T-shirt x-ray 3-D 2x4 can't don't it's they're I'm cannot gonna 'twas O'Neil "
            "o'clock y'all ol' '90s 90's 1990s 5 10 3.5 1,000 1/2 10:30 -5 +3 $5 # % & @ www.x.com me@x.org "
            ":) :D ^_^ c++ AT&T don’t it’s café").split()
    punct = list(".,;:!?-()[]{}<>\"'`/\\*=_+~|^…—–“”‘’«»·°²½")
    out = []
    for _ in range(n):
        words = []
        for _ in range(rng.randint(1, 14)):
            r = rng.random()
            word = rng.choice(base) if r < 0.65 else rng.choice(punct) if r < 0.85 else \
                rng.choice(base) + rng.choice(punct) + rng.choice(base)
            words.append(word)
        out.append("".join(w + rng.choice([" ", " ", " ", "", "  "]) for w in words).strip())
    return out


def _fuzz_characters(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pieces = ["www", ".", "com", "http", "://", "@", "#", "-", "_", "/", "'", "’", "n't", "s", "ll", "a", "x", "U",
              "S", "I", "Mr", "St", "Co", "Ltd", "etc", "Jan", "5", "12", "1,000", ":", ",", ";", "!", "?", "(", ")",
              "<", ">", '"', "`", "&", "amp", "$", "US", "%", "*", "=", "+", "\t", "\u00a0", " ", " ", " ", "...",
              "--", "—", "jpg", "ca", "No", "The", "He", "gonna", "cannot", "'t", "o", "O", "d", "y", "all", "90s",
              "c", "++", "½", "²", "é", "😀"]
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 25))) for _ in range(n)]


@needs_java
def test_tokenizer_equals_pycocoevalcap_ptbtokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    sentences = TOKENIZER_SENTENCES + _fuzz_sentences(600, seed=1) + _fuzz_characters(600, seed=2)
    # several captions per image, in image order, as COCOEvalCap passes them
    captions = {i // 3: [] for i in range(len(sentences))}
    for i, sentence in enumerate(sentences):
        captions[i // 3].append({"caption": sentence})
    expected = PTBTokenizer().tokenize(captions)
    assert tokenize_captions(captions) == expected


@needs_java
def test_tokenizer_context_across_captions():
    """Trailing context reads into the next caption(s), blank ones included ("etc." before a
    capitalised caption gives "etc. ."), exactly as the jar reading the joined file."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    rng = random.Random(3)
    pool = ["apples etc.", "", "  ", "\u00a0", "A man", "the U.S.", "The dog", "Mr.", "Smith", "U.S.", "a", "etc.",
            "5", "No.", "ca.", "3 1/2", "Their x", "<b> x", "x.jpg", "I.", "Calif.", " The end", "It's", "'s", "\u3000"]
    captions = {i: [{"caption": rng.choice(pool)} for _ in range(rng.randint(1, 4))] for i in range(300)}
    assert tokenize_captions(captions) == PTBTokenizer().tokenize(captions)


@needs_java
def test_score_captions_equals_the_pycocoevalcap_pipeline(tmp_path):
    """The whole path: pycocoevalcap PTBTokenizer on references and on candidates, then Cider."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    rng = random.Random(5)
    sentences = _fuzz_sentences(200, seed=2) + TOKENIZER_SENTENCES
    images = list(range(40))
    annotations = {"images": [{"id": i} for i in images],
                   "annotations": [{"image_id": i, "id": 10 * i + k, "caption": rng.choice(sentences)}
                                   for i in images for k in range(rng.randint(1, 5))]}
    predictions = [{"image_id": i, "caption": rng.choice(sentences)} for i in reversed(images)]
    gts = {i: [a for a in annotations["annotations"] if a["image_id"] == i] for i in images}
    res = {i: [p for p in predictions if p["image_id"] == i] for i in images}
    ref_score, _ = Cider().compute_score(PTBTokenizer().tokenize(gts), PTBTokenizer().tokenize(res))
    ours = score_captions(annotations, predictions)
    java = score_captions(annotations, predictions, tokenizer="java")
    assert ours["cider"] == pytest.approx(float(ref_score), abs=1e-9)
    assert java["cider"] == pytest.approx(float(ref_score), abs=1e-9)


# ---------------------------------------------------------------------------------------------
# VQA: a verbatim copy of vqaEval.py master (tables shared; they are data copied from the file)


class _OfficialVQAEval:
    def __init__(self):
        self.contractions = dict(CONTRACTIONS)
        self.manualMap = dict(MANUAL_MAP)
        self.articles = list(ARTICLES)
        self.periodStrip = re.compile("(?!<=\\d)(\\.)(?!\\d)")
        self.commaStrip = re.compile("(\\d)(\\,)(\\d)")
        self.punct = list(PUNCT)

    def processPunctuation(self, inText):  # noqa: N802, N803
        outText = inText  # noqa: N806
        for p in self.punct:
            if (p + ' ' in inText or ' ' + p in inText) or (re.search(self.commaStrip, inText) != None):  # noqa: E711
                outText = outText.replace(p, '')  # noqa: N806
            else:
                outText = outText.replace(p, ' ')  # noqa: N806
        outText = self.periodStrip.sub("", outText, re.UNICODE)  # noqa: N806
        return outText

    def processDigitArticle(self, inText):  # noqa: N802, N803
        outText = []  # noqa: N806
        tempText = inText.lower().split()  # noqa: N806
        for word in tempText:
            word = self.manualMap.setdefault(word, word)
            if word not in self.articles:
                outText.append(word)
            else:
                pass
        for wordId, word in enumerate(outText):  # noqa: N806
            if word in self.contractions:
                outText[wordId] = self.contractions[word]
        outText = ' '.join(outText)  # noqa: N806
        return outText

    def evaluate(self, gts, res, quesIds):  # noqa: N803
        accQA = []  # noqa: N806
        for quesId in quesIds:  # noqa: N806
            for ansDic in gts[quesId]['answers']:  # noqa: N806
                ansDic['answer'] = ansDic['answer'].replace('\n', ' ')
                ansDic['answer'] = ansDic['answer'].replace('\t', ' ')
                ansDic['answer'] = ansDic['answer'].strip()
            resAns = res[quesId]['answer']  # noqa: N806
            resAns = resAns.replace('\n', ' ')  # noqa: N806
            resAns = resAns.replace('\t', ' ')  # noqa: N806
            resAns = resAns.strip()  # noqa: N806
            gtAcc = []  # noqa: N806
            gtAnswers = [ans['answer'] for ans in gts[quesId]['answers']]  # noqa: N806
            if len(set(gtAnswers)) > 1:
                for ansDic in gts[quesId]['answers']:  # noqa: N806
                    ansDic['answer'] = self.processPunctuation(ansDic['answer'])
                    ansDic['answer'] = self.processDigitArticle(ansDic['answer'])
                resAns = self.processPunctuation(resAns)  # noqa: N806
                resAns = self.processDigitArticle(resAns)  # noqa: N806
            for gtAnsDatum in gts[quesId]['answers']:  # noqa: N806
                otherGTAns = [item for item in gts[quesId]['answers'] if item != gtAnsDatum]  # noqa: N806
                matchingAns = [item for item in otherGTAns if item['answer'] == resAns]  # noqa: N806
                acc = min(1, float(len(matchingAns)) / 3)
                gtAcc.append(acc)
            avgGTAcc = float(sum(gtAcc)) / len(gtAcc)  # noqa: N806
            accQA.append(avgGTAcc)
        return accQA, round(100 * float(sum(accQA)) / len(accQA), 2)


ANSWER_POOL = ["yes", "Yes", "yes.", "Yes!", "no", "No", "2", "two", "Two", "1,000", "1000", "1,000 dogs, 2 cats",
               "3.5", "3.5.", "the dog", "dog", "a dog", "A Dog", "don't", "dont", "red", "(red)", " red", "red\n",
               "red\tcar", "none", "0", "e.g.", "black/white", "black & white", "left-side", "left side", "ten",
               "10", "it's", "its", "whats", "what's", "hot-dog", "hot dog", "...", "[2]", "\"ok\"", "ok"]


def test_vqa_equals_verbatim_official_code():
    rng = random.Random(7)
    gts, res, anns = {}, {}, []
    for qid in range(400):
        pool = rng.sample(ANSWER_POOL, rng.choice([1, 1, 2, 3, 4]))
        answers = [{"answer": rng.choice(pool), "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)]
        prediction = rng.choice(pool + [rng.choice(ANSWER_POOL)])
        gts[qid] = {"answers": [dict(a) for a in answers]}
        res[qid] = {"answer": prediction}
        anns.append({"question_id": qid, "image_id": qid, "question_type": "t", "answer_type": "a", "answers": answers})
    official_per_q, official_overall = _OfficialVQAEval().evaluate(gts, res, list(range(400)))
    ours = [vqa_accuracy(res[q]["answer"], anns[q]["answers"]) for q in range(400)]
    assert ours == official_per_q  # bit-identical
    questions = {"questions": [{"question_id": q, "image_id": q} for q in range(400)]}
    predictions = [{"question_id": q, "answer": res[q]["answer"]} for q in range(400)]
    result = score_vqa(questions, {"annotations": anns}, json.loads(json.dumps(predictions)))
    assert result["overall"] == official_overall
    assert result["overall_unrounded"] == 100 * float(sum(official_per_q)) / len(official_per_q)
    assert len({round(a, 6) for a in ours}) >= 5  # the sample exercises several ladder values
