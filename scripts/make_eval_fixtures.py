"""Reference values for lmforge's text metrics (tests/eval_metrics.rs).

Writes tests/fixtures/eval/metrics.json: for several small corpora (empty hypotheses, unicode,
tokenisation edge cases, several references) sacrebleu's corpus BLEU and chrF, rouge-score's
ROUGE-L F (with and without the Porter stemmer) per item, and SQuAD v1.1's official EM / F1 per
item. Run with the reference venv:

    .venv-ref/bin/pip install sacrebleu rouge-score
    .venv-ref/bin/python scripts/make_eval_fixtures.py
"""
import collections
import json
import os
import re
import string

import sacrebleu
from rouge_score import rouge_scorer


# SQuAD v1.1's evaluate-v1.1.py, verbatim in substance.
def normalize_answer(s):
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def squad_f1(prediction, ground_truth):
    p = normalize_answer(prediction).split()
    g = normalize_answer(ground_truth).split()
    common = collections.Counter(p) & collections.Counter(g)
    same = sum(common.values())
    if same == 0:
        return 0.0
    pr, rc = same / len(p), same / len(g)
    return 2 * pr * rc / (pr + rc)


def squad_em(prediction, ground_truth):
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


CORPORA = {
    "plain": (
        ["The cat sat on the mat.", "A quick brown fox jumps over the lazy dog",
         "It is a guide to action which ensures that the military always obeys the commands of the party."],
        [["The cat is sitting on the mat.", "There is a cat on the mat."],
         ["The quick brown fox jumped over the lazy dog."],
         ["It is a guide to action that ensures that the military will forever heed Party commands."]],
    ),
    "empty_hypotheses": (
        ["", "Hello there, general Kenobi!", ""],
        [["Nothing to see here."], ["Hello there, General Kenobi!"], ["Another one."]],
    ),
    "all_empty": ([""], [["Something."]]),
    "no_match": (["zzz qqq"], [["The answer is 42."]]),
    "unicode": (
        ["Über die Brücke gingen 3.000 Menschen – schnell!", "東京は日本の首都です。", "naïve café 🎉 résumé"],
        [["Über die Brücke liefen 3.000 Menschen, schnell."], ["日本の首都は東京です。"], ["naive cafe résumé 🎉"]],
    ),
    "tokenisation": (
        ["Prices rose 3.5% to $1,000.50 in 2020-2021 (est.).",
         "He said &quot;no&quot; &amp; left<skipped> at 5-6 p.m.",
         "co-operate-\nly with e-mail, U.S.A. and a.b.c.",
         "  spaces\tand\nnewlines   "],
        [["Prices rose 3.5 % to $ 1,000.50 in 2020 - 2021 (estimated)."],
         ["He said \"no\" & left at 5-6 p.m."],
         ["cooperately with email, USA and abc."],
         ["spaces and newlines"]],
    ),
    "stemming": (
        ["The runners were running quickly through the generously sized parks",
         "connections connected connecting"],
        [["A runner runs quick through generous parks"], ["connect connection connects"]],
    ),
}

SQUAD = [
    ("Denver Broncos", ["Denver Broncos", "The Denver Broncos"]),
    ("the broncos team", ["Denver Broncos", "Broncos"]),
    ("", ["Carolina Panthers"]),
    ("Santa Clara, California", ["Santa Clara, California", "Levi's Stadium"]),
    ("Levis stadium in the bay area", ["Levi's Stadium", "Levi's Stadium in the San Francisco Bay Area"]),
    ("  An  apple a day ", ["apple day"]),
    ("Ünïcode — test!", ["ünïcode test"]),
    ("1,000 people", ["1000 people"]),
    ("The", ["the"]),
    ("the—end of a story", ["—end story"]),
]


def main():
    out = {"sacrebleu": sacrebleu.__version__, "corpora": [], "squad": []}
    plain = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    stem = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for name, (hyps, refs) in CORPORA.items():
        n_refs = max(len(r) for r in refs)
        # sacrebleu takes reference *streams*; pad with None where an item has fewer.
        streams = [[r[i] if i < len(r) else None for r in refs] for i in range(n_refs)]
        bleu = sacrebleu.corpus_bleu(hyps, streams)
        chrf = sacrebleu.corpus_chrf(hyps, streams)
        out["corpora"].append({
            "name": name, "hyps": hyps, "refs": refs,
            "bleu": bleu.score, "bleu_precisions": bleu.precisions, "bleu_bp": bleu.bp,
            "bleu_sys_len": bleu.sys_len, "bleu_ref_len": bleu.ref_len,
            "chrf": chrf.score,
            "rouge_l": [max(plain.score(r, h)["rougeL"].fmeasure for r in rs) for h, rs in zip(hyps, refs)],
            "rouge_l_stem": [max(stem.score(r, h)["rougeL"].fmeasure for r in rs) for h, rs in zip(hyps, refs)],
            "tok13a": [sacrebleu.tokenizers.tokenizer_13a.Tokenizer13a()(h) for h in hyps],
        })
    for pred, golds in SQUAD:
        out["squad"].append({
            "prediction": pred, "answers": golds,
            "em": max(squad_em(pred, g) for g in golds),
            "f1": max(squad_f1(pred, g) for g in golds),
        })
    path = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "eval", "metrics.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
