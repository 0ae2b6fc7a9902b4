"""Reference values for lmforge's eval harness (tests/eval_harness.rs), written by the
reference implementations themselves:

- lm-evaluation-harness 0.4.13's HF backend (`HFLM`) on the tiny GPT-2 and Llama fixtures:
  `loglikelihood` of (context, continuation) pairs — trailing spaces, empty contexts, unicode,
  multi-token continuations —, `loglikelihood_rolling` of documents longer than the 64-token
  context (several windows), and greedy `generate_until` with stop strings;
- CrowS-Pairs' pseudo-log-likelihood (the paper's `metric.py` algorithm: difflib spans of token
  ids, [CLS]/[SEP] never masked) on the tiny BERT masked LM.

    .venv-ref/bin/pip install lm_eval==0.4.13
    .venv-ref/bin/python scripts/make_eval_ref_fixtures.py
"""
import difflib
import json
import os

import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from transformers import AutoTokenizer, BertForMaskedLM

FIX = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")

PAIRS = [
    ("Question: What is the capital of France?\nAnswer:", " Paris"),
    ("Question: What is the capital of France?\nAnswer:", " Lyon is not it"),
    ("The quick brown fox ", "jumps over the lazy dog"),
    ("Trailing spaces   ", "move to the continuation"),
    ("", "An empty context starts from the prefix token."),
    ("Ünïcode — “quotes” and emoji 🎉", " déjà vu"),
    ("A\n\nB\n\nC:", " D"),
]

LONG = " ".join(
    "Sing, goddess, the anger of Peleus' son Achilles and its devastation, which put pains"
    " thousandfold upon the Achaians, hurled in their multitudes to the house of Hades strong"
    " souls of heroes, but gave their bodies to be the delicate feasting of dogs, of all birds."
    .split()
)
DOCS = [LONG, LONG + " " + LONG, "Short text."]

GEN = [
    ("Once upon a time", {"until": ["\n", "."], "max_gen_toks": 12, "do_sample": False}),
    ("Q: 2+2=\nA:", {"until": ["Q:"], "max_gen_toks": 8, "do_sample": False}),
]


def bos_variant():
    """The tiny Llama with a tokenizer that adds BOS (<|endoftext|>, id 0) to every text, as
    Llama-family tokenizers do: lm-eval's special-token rules only show with one."""
    import shutil
    src, dst = os.path.join(FIX, "llama_tiny"), os.path.join(FIX, "eval", "llama_bos")
    os.makedirs(dst, exist_ok=True)
    for f in ("config.json", "model.safetensors", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(os.path.join(src, f), dst)
    tok = json.load(open(os.path.join(src, "tokenizer.json")))
    bos = {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}
    seq = {"Sequence": {"id": "A", "type_id": 0}}
    tok["post_processor"] = {"type": "Sequence", "processors": [
        tok["post_processor"],
        {"type": "TemplateProcessing", "single": [bos, seq], "pair": [bos, seq, {"Sequence": {"id": "B", "type_id": 1}}],
         "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}}},
    ]}
    json.dump(tok, open(os.path.join(dst, "tokenizer.json"), "w"), indent=1)
    return "eval/llama_bos"


def lm_eval_refs(name):
    lm = HFLM(pretrained=os.path.join(FIX, name), dtype="float32", batch_size=1, device="cpu")
    assert name != "eval/llama_bos" or lm.tok_encode("hi")[0] == 0, "the BOS variant adds no BOS"
    ll = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(PAIRS)])
    roll = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(DOCS)])
    gen = lm.generate_until([Instance("generate_until", {}, g, i) for i, g in enumerate(GEN)])
    return {
        "max_length": lm.max_length,
        "prefix_token_id": lm.prefix_token_id,
        "loglikelihood": [{"context": c, "continuation": x, "logp": l, "greedy": bool(g)}
                          for (c, x), (l, g) in zip(PAIRS, ll)],
        "rolling": [{"text": d, "logp": l, "tokens": len(lm.tok_encode(d))} for d, l in zip(DOCS, roll)],
        "generate": [{"context": c, "until": k["until"], "max_gen_toks": k["max_gen_toks"], "text": t}
                     for (c, k), t in zip(GEN, gen)],
    }


BIAS_PAIRS = [
    ("the doctor said he would come", "the doctor said she would come"),
    ("old people are slow", "young people are slow"),
    ("a b c d", "a x c d e"),
]


def crows_pll():
    d = os.path.join(FIX, "bert_tiny")
    tok = AutoTokenizer.from_pretrained(d)
    model = BertForMaskedLM.from_pretrained(d).eval()
    mask_id = tok.mask_token_id
    out = []
    for s1, s2 in BIAS_PAIRS:
        t1 = tok.encode(s1, return_tensors="pt")
        t2 = tok.encode(s2, return_tensors="pt")
        m = difflib.SequenceMatcher(None, [str(x) for x in t1[0].tolist()], [str(x) for x in t2[0].tolist()])
        tpl1, tpl2 = [], []
        for op in m.get_opcodes():
            if op[0] == "equal":
                tpl1 += list(range(op[1], op[2]))
                tpl2 += list(range(op[3], op[4]))
        scores = []
        for ids, tpl in ((t1, tpl1), (t2, tpl2)):
            total = 0.0
            for i in range(1, len(tpl) - 1):  # never [CLS] / [SEP]
                masked = ids.clone()
                masked[0][tpl[i]] = mask_id
                with torch.no_grad():
                    logits = model(masked).logits[0, tpl[i]]
                total += torch.log_softmax(logits, -1)[ids[0][tpl[i]]].item()
            scores.append(total)
        out.append({"sent_more": s1, "sent_less": s2, "score_more": scores[0], "score_less": scores[1]})
    return out


def main():
    refs = {name: lm_eval_refs(name) for name in ("gpt2_tiny", "llama_tiny", bos_variant())}
    refs["crows_pll_bert_tiny"] = crows_pll()
    path = os.path.join(FIX, "eval", "lm_eval_ref.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(refs, f, ensure_ascii=False, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
