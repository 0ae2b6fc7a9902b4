#!/usr/bin/env python3
"""Writes tests/fixtures/eval/porter.tsv: `word<TAB>stem` lines, the stem being what
nltk.stem.porter.PorterStemmer() (default NLTK_EXTENSIONS mode, as used by rouge-score with
use_stemmer=True) returns. src/eval/porter.rs checks its port against every line.

Words: a hand list of the paper's examples and NLTK's special cases, numbers and alphanumerics,
a few non-ASCII/uppercase/odd strings, then rouge-style tokens (lowercase, split on [^a-z0-9]+)
of local English text (docs/*.md, README.md and some Shakespeare under data/), picked round-robin
over word endings so that every suffix rule is exercised, up to ~3000 distinct words.

Run: .venv-ref/bin/python scripts/make_porter_fixture.py   (from the repository root)
"""
import collections
import pathlib
import re

from nltk.stem.porter import PorterStemmer

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "eval" / "porter.tsv"
TARGET = 3000

HAND = """
generously sky skies dying lying tying news innings inning outings outing cannings canning howe
proceed exceed succeed agreed feed happy relational conditional rational valenci hesitanci
digitizer conformabli radicalli differentli vileli analogousli vietnamization predication
operator feudalism decisiveness hopefulness callousness formaliti sensitiviti sensibiliti
triplicate formative formalize electriciti electrical hopeful goodness revival allowance
inference airliner gyroscopic adjustable defensible irritant replacement adjustment dependent
adoption homologou communism activate angulariti homologous effective bowdlerize probate rate
cease controll roll fly flies died ties agreement sixty abc a is 1999 x1y2
caresses ponies caress cats plastered bled motoring sing conflated troubled sized hopping tanned
falling hissing fizzed failing filing spied spies dies lies tried cries enjoy enjoyment spy try
toy syzygy ivy by trouble troubles oats trees tree private oaten orrery falafel architecture
generalli fulli hopefulli carefulli archaeologi geologi theologi philologi logi geo theo
rationalli conditionalli traditionalli sensationalli bli abli possibli eli ousli
ied eed ies sses ss s ed ing y yy yyy yyyy yyyyy ay oy ey sayed saying played playing
bed red need seed speed bleed breed tied lied vied hied eyed dyed owed ow ing sting bring
hoping hopping filed filled tanning ceasing rated rating probating controlling rolling
hissed fizzing buzzed buzzing fussing falling installing spelled killing
gases bases crises analyses theses oxen children mice feet geese
universal university universe universities generalization generalizations organization
organizational electricity electrically hopelessness carefulness usefulness
running runner runs ran swimming swimmer happily happiness unhappiness
nationalism nationalist nationality nationalize nationalization nationally
sensational sensationalism conditioning conditioned reconditioning
abate abatement abating abated able ably ability abilities
""".split()

NUMERIC = """
0 1 7 10 42 99 100 123 2000 2023 1999s 3rd 1st 2nd 4th 21st 10th 100th 1990s 80s 3d 4k
x1y2 a1 b2b covid19 mp3 mp4 h2o co2 4x4 v8 b12 gpt2 gpt4 utf8 ipv6 b52s 7eleven
1ies 2ied 3eed 4ing 5ed 6ss 7sses abc123ing 123ational 9alli 0logi 12ness 1ful
""".split()

ODD = """
Caresses RUNNING Happy SKIES Dying NEWS Proceed McDonalds iPhones
café cafés naïve naïvely résumé résumés façade façades über ñandú jalapeños
ab*ded x*d *d ** *** a*b y*ing
""".split()

SOURCES = (
    sorted((ROOT / "docs").glob("*.md"))
    + [ROOT / "README.md"]
    + [
        ROOT / "data" / "shakespeare" / name
        for name in ("hamlet.txt", "julius_caesar.txt", "twelfth_night.txt", "henry_v.txt")
    ]
)


def corpus_words():
    counts = collections.Counter()
    for path in SOURCES:
        if path.exists():
            text = path.read_text(encoding="utf-8", errors="replace").lower()
            counts.update(t for t in re.split(r"[^a-z0-9]+", text) if t)
    # Round-robin over 3-letter endings (most frequent words first within each) so the
    # sample covers many different suffixes rather than just the most common words.
    by_end = collections.defaultdict(list)
    for word, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        by_end[word[-3:]].append(word)
    queues = [collections.deque(v) for _, v in sorted(by_end.items())]
    while any(queues):
        for q in queues:
            if q:
                yield q.popleft()


def main():
    words = []
    seen = set()
    for word in [*HAND, *NUMERIC, *ODD, *corpus_words()]:
        if len(words) >= TARGET:
            break
        if word not in seen and "\t" not in word and "\n" not in word:
            seen.add(word)
            words.append(word)
    stemmer = PorterStemmer()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("w", encoding="utf-8", newline="\n") as f:
        for word in words:
            f.write(f"{word}\t{stemmer.stem(word)}\n")
    print(f"wrote {len(words)} words to {OUT.relative_to(ROOT)} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
