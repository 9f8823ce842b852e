"""The paper's NLP setting: three multiple-choice QA client domains and the Alpaca public pool.

Client domains (K = 3): CommonsenseQA ``tau/commonsense_qa``, CosmosQA ``allenai/cosmos_qa``
and SocialIQA ``allenai/social_i_qa``; each client trains on the first 10,000 examples of its
train split and is evaluated on the validation split. The public pool D0 is Alpaca
``tatsu-lab/alpaca`` (52K rows). Text formats follow the authors' ``nlp/data.py``:

* CSQA      ``"Question: {q} \\nChoices:\\nA. …\\n…E. …\\n"`` (note the space before the newline)
* CosmosQA  ``"Context: {c}\\nQuestion: {q}\\nChoices:\\nA. …\\n…D. …\\n"``
* SocialIQA ``"Context: {c}\\nQuestion: {q}\\nChoices:\\nA. …\\nB. …\\nC. …\\n"``
* Alpaca    ``"Question: {instruction}\\n"`` plus ``"Input: {input}\\n"`` when the input is non-empty

A *prompt* here never contains the answer cue. The texts built from it:

* private training text (stage 2):   ``prompt + "Answer: " + letter``        (:func:`train_text`)
* proxy text, stage 2 (prompt only):  ``prompt + "Answer: "``                 (:func:`cue_text`)
* proxy text, stage 3 (with response): ``prompt + "Answer: " + output``       (:func:`train_text`)
* classifier input: ``prompt + "Answer:"`` - see :func:`encode_next_token`: the next-token logits
  at its last position score the answer's first token (the letter, in the tokenizer's form it
  takes after ``"Answer:"`` in the training text, e.g. ``" A"`` for byte-level BPE).

Relevance classifier texts (stage 1): negatives are Alpaca ``(instruction + " " + input).strip()``.
Positives: the spec (§2.1) says "prompt only (no answer)"; the released
``nlp/nlp_create_proxy_data.py`` actually feeds the bare question (CSQA) or
``context + " " + question`` (CosmosQA, SocialIQA), stripped, without the choices - it builds the
choices text and never uses it. :func:`relevance_text` does the code's ``style="code"`` by default
and the spec's reading with ``style="prompt"``.

Loaders read the Hub through ``datasets.load_dataset`` (``pip install metamoe-fl[hf]``), or local
files in the same schema (``source=`` a file or a directory of ``{split}.jsonl|json|parquet|csv``)
through the same ``datasets`` code path.

The code is split by concern: :mod:`metamoe.data.qa_format` (domain names, row schemas and the
text formats above), :mod:`metamoe.data.qa_load` (the Hub ids and the loaders) and
:mod:`metamoe.data.qa_encode` (the next-token tokenisation). This module re-exports their public
names and builds the benchmark (:func:`build_hf_qa_benchmark`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from metamoe.data.qa_encode import (
    NextTokenEncoding,
    choice_predictions,
    encode_next_token,
    letter_token_ids,
)
from metamoe.data.qa_encode import _special_prefix as _special_prefix  # re-exported for tests/test_hf_text.py
from metamoe.data.qa_format import (
    ANSWER_CUE,
    ANSWER_SEP,
    DOMAINS,
    NUM_CHOICES,
    MalformedRowError,
    QAItem,
    alpaca_negative_text,
    alpaca_prompt,
    alpaca_text,
    canonical_domain,
    cue_text,
    format_commonsense_qa,
    format_cosmos_qa,
    format_qa,
    format_social_i_qa,
    relevance_text,
    train_text,
)
from metamoe.data.qa_load import ALPACA_HUB_ID, HUB_IDS, HUB_MIRRORS, AlpacaPool, QASplit, load_alpaca, load_qa_domain

__all__ = [
    "ALPACA_HUB_ID",
    "ANSWER_CUE",
    "ANSWER_SEP",
    "DOMAINS",
    "HUB_IDS",
    "HUB_MIRRORS",
    "NUM_CHOICES",
    "AlpacaPool",
    "MalformedRowError",
    "NextTokenEncoding",
    "QAItem",
    "QASplit",
    "alpaca_negative_text",
    "alpaca_prompt",
    "alpaca_text",
    "canonical_domain",
    "choice_predictions",
    "cue_text",
    "encode_next_token",
    "format_commonsense_qa",
    "format_cosmos_qa",
    "format_qa",
    "format_social_i_qa",
    "letter_token_ids",
    "load_alpaca",
    "load_qa_domain",
    "relevance_text",
    "train_text",
]


def build_hf_qa_benchmark(tokenizer, max_len: int, domains: Sequence[str] = DOMAINS,
                          max_train: int = 10_000, max_test: int = -1, max_pool: int = -1,
                          data_dir: str = "", val_fraction: float = 0.0, seed: int = 0):
    """The paper's NLP benchmark: QA client domains (train: the first ``max_train`` rows of the
    train split; test: the validation split) and Alpaca as the public pool, tokenised for
    next-token classification with a causal LM (:func:`encode_next_token`).

    ``data_dir`` holds local files in the hub schemas (``<domain>/{train,validation}.*`` and
    ``alpaca/train.*``); empty: the HF hub. Labels are vocabulary ids (answer letters; the first
    response token for Alpaca), each domain evaluated over its own letters. ``val_fraction`` of
    the train rows (seeded) becomes the validation split (:func:`carve_val`).
    """
    from metamoe.data.vision import Domain, VisionBenchmark, carve_val

    def src(name: str) -> str | None:
        return str(Path(data_dir) / name) if data_dir else None

    def lim(n: int) -> int | None:
        return None if n < 0 else n

    doms = []
    for name in domains:
        dom = canonical_domain(name)
        tr = load_qa_domain(dom, "train", lim(max_train), src(dom))
        te = load_qa_domain(dom, "validation", lim(max_test), src(dom))
        k = NUM_CHOICES[dom]
        etr = encode_next_token(tokenizer, tr.prompts, tr.answers, max_len, num_choices=k)
        ete = encode_next_token(tokenizer, te.prompts, te.answers, max_len, num_choices=k)
        x, y = etr.input_ids.numpy(), etr.labels.numpy()
        train, val = carve_val(np.random.default_rng(seed).permutation(len(x)), val_fraction,
                               max_val=max_test)
        train, val = np.sort(train), np.sort(val)
        doms.append(Domain(dom, x[train], y[train], ete.input_ids.numpy(),
                           ete.labels.numpy(), [int(c) for c in etr.choice_ids],
                           f"{dom} ({tr.source}), {k} choices", x_val=x[val], y_val=y[val]))
    pool = load_alpaca(lim(max_pool), src("alpaca"))
    enc = encode_next_token(tokenizer, pool.prompts, [r if r.strip() else "." for r in
                                                      pool.responses], max_len)
    names = [str(t) for t in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))]
    return VisionBenchmark("hf_qa", doms, enc.input_ids.numpy(), enc.labels.numpy(),
                           np.asarray(["alpaca"] * len(pool)), class_names=names)
