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
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

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

log = logging.getLogger(__name__)

DOMAINS = ("commonsense_qa", "cosmos_qa", "social_i_qa")
HUB_IDS = {
    "commonsense_qa": "tau/commonsense_qa",
    "cosmos_qa": "allenai/cosmos_qa",
    "social_i_qa": "allenai/social_i_qa",
}
ALPACA_HUB_ID = "tatsu-lab/alpaca"
NUM_CHOICES = {"commonsense_qa": 5, "cosmos_qa": 4, "social_i_qa": 3}
ANSWER_CUE = "Answer:"
# The separator between the cue and the answer in every training text ("Answer: A").
ANSWER_SEP = " "

# Script-free mirrors tried when a Hub repo still ships a loading script (datasets >= 4 refuses
# those). lighteval/siqa: same rows and columns as allenai/social_i_qa (train 33410 /
# validation 1954), checked by content hash in EleutherAI/lm-evaluation-harness PR #3943.
HUB_MIRRORS = {"social_i_qa": ("lighteval/siqa",)}

_ALIASES = {
    "commonsense_qa": "commonsense_qa", "commonsenseqa": "commonsense_qa", "csqa": "commonsense_qa",
    "tau/commonsense_qa": "commonsense_qa",
    "cosmos_qa": "cosmos_qa", "cosmosqa": "cosmos_qa", "cosmos": "cosmos_qa",
    "allenai/cosmos_qa": "cosmos_qa",
    "social_i_qa": "social_i_qa", "socialiqa": "social_i_qa", "social_iqa": "social_i_qa",
    "siqa": "social_i_qa", "allenai/social_i_qa": "social_i_qa",
}


class MalformedRowError(ValueError):
    """A row that does not follow its dataset's schema (names the dataset, row and field)."""

    def __init__(self, dataset: str, idx: int, problem: str):
        super().__init__(f"{dataset}: row {idx}: {problem}")
        self.dataset, self.idx, self.problem = dataset, idx, problem


def canonical_domain(name: str) -> str:
    """``"csqa"``, ``"tau/commonsense_qa"``, … -> ``"commonsense_qa"`` (one of :data:`DOMAINS`)."""
    key = name.strip().lower().replace("-", "_")
    if key not in _ALIASES:
        raise ValueError(f"unknown QA domain {name!r}; expected one of {', '.join(DOMAINS)}")
    return _ALIASES[key]


# ----------------------------------------------------------------------------- row formatting


@dataclass(frozen=True)
class QAItem:
    prompt: str        # without the answer cue; ends with "\n"
    answer: str        # the gold letter, "A".."E"
    num_choices: int


def _field(ds: str, row: Mapping[str, Any], idx: int, name: str, kind: type = str) -> Any:
    if name not in row:
        raise MalformedRowError(ds, idx, f"missing field {name!r}")
    v = row[name]
    if v is None:
        raise MalformedRowError(ds, idx, f"missing field {name!r} (null)")
    if kind is str and not isinstance(v, str):
        raise MalformedRowError(ds, idx, f"field {name!r} must be a string, got {type(v).__name__}")
    return v


def _letters(n: int) -> list[str]:
    return [chr(65 + i) for i in range(n)]


def format_commonsense_qa(row: Mapping[str, Any], idx: int = 0) -> QAItem:
    """``tau/commonsense_qa``: id, question, question_concept, choices{label[], text[]}, answerKey."""
    ds = "commonsense_qa"
    q = _field(ds, row, idx, "question")
    ch = _field(ds, row, idx, "choices", object)
    if not isinstance(ch, Mapping) or "label" not in ch or "text" not in ch:
        raise MalformedRowError(ds, idx, "field 'choices' must hold 'label' and 'text' lists")
    labels, texts = list(ch["label"] or []), list(ch["text"] or [])
    if len(labels) != len(texts) or not labels:
        raise MalformedRowError(ds, idx, f"'choices' has {len(labels)} labels and {len(texts)} texts")
    if labels != _letters(len(labels)):
        raise MalformedRowError(ds, idx, f"choice labels {labels} are not A, B, C, …")
    key = _field(ds, row, idx, "answerKey")
    if key not in labels:
        raise MalformedRowError(ds, idx, f"answerKey {key!r} is not one of the choice labels {labels}"
                                + (" (unlabelled split?)" if key == "" else ""))
    prompt = f"Question: {q} \nChoices:\n" + "".join(f"{lab}. {t}\n" for lab, t in zip(labels, texts))
    return QAItem(prompt, key, len(labels))


def format_cosmos_qa(row: Mapping[str, Any], idx: int = 0) -> QAItem:
    """``allenai/cosmos_qa``: id, context, question, answer0..answer3, label (int 0..3)."""
    ds = "cosmos_qa"
    c, q = _field(ds, row, idx, "context"), _field(ds, row, idx, "question")
    answers = [_field(ds, row, idx, f"answer{i}") for i in range(4)]
    label = _int_label(ds, row, idx, lo=0, hi=3)
    prompt = f"Context: {c}\nQuestion: {q}\nChoices:\n" + "".join(
        f"{L}. {a}\n" for L, a in zip(_letters(4), answers))
    return QAItem(prompt, chr(65 + label), 4)


def format_social_i_qa(row: Mapping[str, Any], idx: int = 0) -> QAItem:
    """``allenai/social_i_qa``: context, question, answerA..answerC, label (string "1".."3")."""
    ds = "social_i_qa"
    c, q = _field(ds, row, idx, "context"), _field(ds, row, idx, "question")
    answers = [_field(ds, row, idx, f"answer{L}") for L in "ABC"]
    label = _int_label(ds, row, idx, lo=1, hi=3)
    prompt = f"Context: {c}\nQuestion: {q}\nChoices:\n" + "".join(
        f"{L}. {a}\n" for L, a in zip("ABC", answers))
    return QAItem(prompt, chr(65 + label - 1), 3)


def _int_label(ds: str, row: Mapping[str, Any], idx: int, lo: int, hi: int) -> int:
    raw = _field(ds, row, idx, "label", object)
    try:
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise ValueError
        v = int(str(raw).strip()) if isinstance(raw, str) else int(raw)
    except (TypeError, ValueError):
        raise MalformedRowError(ds, idx, f"field 'label' = {raw!r} is not an integer") from None
    if not lo <= v <= hi:
        raise MalformedRowError(ds, idx, f"field 'label' = {raw!r} is outside {lo}..{hi}")
    return v


_FORMATTERS: dict[str, Callable[[Mapping[str, Any], int], QAItem]] = {
    "commonsense_qa": format_commonsense_qa,
    "cosmos_qa": format_cosmos_qa,
    "social_i_qa": format_social_i_qa,
}


def format_qa(name: str, row: Mapping[str, Any], idx: int = 0) -> QAItem:
    return _FORMATTERS[canonical_domain(name)](row, idx)


def relevance_text(name: str, row: Mapping[str, Any], idx: int = 0, style: str = "code") -> str:
    """Stage-1 relevance-classifier positive for one private row (never contains the answer).

    ``style="code"`` (default): what the released ``nlp_create_proxy_data.py`` feeds - the bare
    question for CSQA, ``context + " " + question`` for CosmosQA/SocialIQA, stripped.
    ``style="prompt"``: the spec's reading - the full prompt with choices, no cue, stripped.
    """
    dom = canonical_domain(name)
    if style == "prompt":
        return format_qa(dom, row, idx).prompt.strip()
    if style != "code":
        raise ValueError(f"style must be 'code' or 'prompt', got {style!r}")
    format_qa(dom, row, idx)  # validates the row
    if dom == "commonsense_qa":
        return row["question"].strip()
    return f"{row['context']} {row['question']}".strip()


def train_text(prompt: str, answer: str) -> str:
    """``"{prompt}Answer: {answer}"`` - stage-2 private text (letter), stage-3 proxy text (response)."""
    return f"{prompt}{ANSWER_CUE}{ANSWER_SEP}{answer}"


def cue_text(prompt: str) -> str:
    """``"{prompt}Answer: "`` - stage-2 proxy text and the generation-eval prompt of the code."""
    return f"{prompt}{ANSWER_CUE}{ANSWER_SEP}"


def _alpaca_fields(row: Mapping[str, Any], idx: int) -> tuple[str, str]:
    ds = "alpaca"
    instr = _field(ds, row, idx, "instruction")
    if "input" not in row:
        raise MalformedRowError(ds, idx, "missing field 'input'")
    inp = row["input"]
    if inp is None:  # CSV readers turn "" into null
        inp = ""
    if not isinstance(inp, str):
        raise MalformedRowError(ds, idx, f"field 'input' must be a string, got {type(inp).__name__}")
    return instr, inp


def alpaca_prompt(row: Mapping[str, Any], idx: int = 0) -> str:
    """``"Question: {instruction}\\n"`` + ``"Input: {input}\\n"`` when the input is non-empty."""
    instr, inp = _alpaca_fields(row, idx)
    return f"Question: {instr}\n" + (f"Input: {inp}\n" if len(inp) > 0 else "")


def alpaca_text(row: Mapping[str, Any], idx: int = 0, with_response: bool = False) -> str:
    """Stage-2 proxy text (``with_response=False``: prompt + ``"Answer: "``) or stage-3 router
    training text (``True``: prompt + ``"Answer: {output}"``)."""
    prompt = alpaca_prompt(row, idx)
    if not with_response:
        return cue_text(prompt)
    return train_text(prompt, _field("alpaca", row, idx, "output"))


def alpaca_negative_text(row: Mapping[str, Any], idx: int = 0) -> str:
    """Stage-1 relevance negative: ``(instruction + " " + input).strip()``."""
    instr, inp = _alpaca_fields(row, idx)
    return f"{instr} {inp}".strip()


# ----------------------------------------------------------------------------- loaders


@dataclass
class QASplit:
    """One split of one QA domain, formatted. ``rows`` are the raw rows (hub schema)."""

    name: str
    split: str
    source: str
    items: list[QAItem]
    rows: list[dict] = field(repr=False)

    @property
    def num_choices(self) -> int:
        return NUM_CHOICES[self.name]

    @property
    def prompts(self) -> list[str]:
        return [it.prompt for it in self.items]

    @property
    def answers(self) -> list[str]:
        return [it.answer for it in self.items]

    def train_texts(self) -> list[str]:
        return [train_text(it.prompt, it.answer) for it in self.items]

    def relevance_texts(self, style: str = "code") -> list[str]:
        return [relevance_text(self.name, r, i, style) for i, r in enumerate(self.rows)]

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class AlpacaPool:
    """The public pool; ``rows[i]`` is D0 index ``i`` (the order of the source)."""

    source: str
    rows: list[dict] = field(repr=False)
    prompts: list[str] = field(repr=False)

    @property
    def responses(self) -> list[str]:
        return [_field("alpaca", r, i, "output") for i, r in enumerate(self.rows)]

    def texts(self, with_response: bool = False) -> list[str]:
        return [alpaca_text(r, i, with_response) for i, r in enumerate(self.rows)]

    def negative_texts(self) -> list[str]:
        return [alpaca_negative_text(r, i) for i, r in enumerate(self.rows)]

    def __len__(self) -> int:
        return len(self.rows)


_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _datasets():
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("the NLP benchmark needs Hugging Face `datasets`: "
                          "pip install 'metamoe-fl[hf]'") from e
    return datasets


def _local_file(source: str | Path, split: str) -> Path:
    p = Path(source).expanduser()
    if p.is_dir():
        hits = [p / f"{split}{ext}" for ext in _BUILDERS if (p / f"{split}{ext}").is_file()]
        if len(hits) != 1:
            raise FileNotFoundError(
                f"{p}: expected exactly one of {', '.join(split + e for e in _BUILDERS)}, found "
                f"{[h.name for h in hits] or 'none'}")
        return hits[0]
    if not p.is_file():
        raise FileNotFoundError(f"no such file or directory: {p}")
    if p.suffix.lower() not in _BUILDERS:
        raise ValueError(f"{p}: unsupported file type {p.suffix!r}; use one of {', '.join(_BUILDERS)}")
    return p


def _load_rows(hub_ids: Sequence[str], split: str, limit: int | None, source: str | Path | None,
               cache_dir: str | None, revision: str | None) -> tuple[list[dict], str]:
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    datasets = _datasets()
    if source is not None:
        path = _local_file(source, split)
        ds = datasets.load_dataset(_BUILDERS[path.suffix.lower()], data_files={split: str(path)},
                                   split=split, cache_dir=cache_dir)
        origin = str(path)
    else:
        ds, origin, errors = None, "", []
        for i, hub_id in enumerate(hub_ids):
            try:
                ds = datasets.load_dataset(hub_id, split=split, cache_dir=cache_dir,
                                           revision=revision if i == 0 else None)
                origin = hub_id
                break
            except RuntimeError as e:
                if "scripts are no longer supported" not in str(e):
                    raise
                errors.append(f"{hub_id}: {e}")
                if i + 1 < len(hub_ids):
                    log.warning("%s ships a loading script that datasets %s refuses; trying the "
                                "script-free mirror %s", hub_id, datasets.__version__, hub_ids[i + 1])
        if ds is None:
            raise RuntimeError("could not load any of " + ", ".join(hub_ids) + ": " + "; ".join(errors)
                               + ". Pass revision='refs/convert/parquet' or source=<local files>.")
    n = len(ds) if limit is None else min(limit, len(ds))
    if n < len(ds):
        ds = ds.select(range(n))
    return ds.to_list(), origin


def load_qa_domain(name: str, split: str, limit: int | None = None, source: str | Path | None = None,
                   *, cache_dir: str | None = None, revision: str | None = None,
                   hub_id: str | None = None) -> QASplit:
    """The first ``limit`` rows (all when None) of ``split`` of a QA domain, formatted.

    By default ``datasets.load_dataset(HUB_IDS[name], split=split)`` (with a script-free mirror
    as fallback, :data:`HUB_MIRRORS`); ``hub_id`` overrides the repo. ``source`` reads local files
    in the hub schema instead: a file, or a directory holding ``{split}.jsonl|json|parquet|csv``
    (CSV cannot hold CSQA's nested ``choices``). Raises :class:`MalformedRowError` on a bad row.
    The paper: ``load_qa_domain(d, "train", 10_000)`` and ``load_qa_domain(d, "validation")``.
    """
    dom = canonical_domain(name)
    ids = (hub_id,) if hub_id else (HUB_IDS[dom], *HUB_MIRRORS.get(dom, ()))
    rows, origin = _load_rows(ids, split, limit, source, cache_dir, revision)
    items = [_FORMATTERS[dom](r, i) for i, r in enumerate(rows)]
    return QASplit(dom, split, origin, items, rows)


def load_alpaca(limit: int | None = None, source: str | Path | None = None, *,
                split: str = "train", cache_dir: str | None = None,
                revision: str | None = None) -> AlpacaPool:
    """The first ``limit`` Alpaca rows (all 52,002 when None) from ``tatsu-lab/alpaca`` or from
    local files (``source``, as in :func:`load_qa_domain`). Schema: instruction, input, output
    (and text, unused)."""
    rows, origin = _load_rows((ALPACA_HUB_ID,), split, limit, source, cache_dir, revision)
    prompts = [alpaca_prompt(r, i) for i, r in enumerate(rows)]
    for i, r in enumerate(rows):
        _field("alpaca", r, i, "output")
    return AlpacaPool(origin, rows, prompts)


# ----------------------------------------------------------------------------- tokenisation


@dataclass
class NextTokenEncoding:
    """A causal LM used as a classifier: ``model(input_ids, attention_mask).logits[:, -1]`` scores
    the token that follows ``"Answer:"``; ``labels`` is the answer's first token there."""

    input_ids: torch.Tensor               # [N, max_len] int64, left-padded, ends with "Answer:"
    attention_mask: torch.Tensor          # [N, max_len] int64, 0 on padding
    labels: torch.Tensor                  # [N] int64 vocab ids
    choice_ids: torch.Tensor | None       # [C] int64 vocab ids of the letters A.. (num_choices given)
    label_choice: torch.Tensor | None     # [N] int64 index of the gold letter into choice_ids
    truncated: int                        # rows cut from the left to fit max_len


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return list(tokenizer(texts, add_special_tokens=False)["input_ids"])


def _special_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts *before* a text (BOS / [CLS]); those it appends
    (EOS / [SEP]) are dropped so the last position is the end of the cue."""
    with_sp = list(tokenizer("x", add_special_tokens=True)["input_ids"])
    bare = list(tokenizer("x", add_special_tokens=False)["input_ids"])
    for k in range(len(with_sp) - len(bare) + 1):
        if with_sp[k:k + len(bare)] == bare:
            return with_sp[:k]
    return []


def _continuations(tokenizer, bodies: list[str], conts: list[str], what: str) -> list[int]:
    """First token of ``cont`` as the tokenizer splits ``body + cont`` (body tokens must be a
    prefix of the joint tokens, else the cue/answer boundary is ambiguous)."""
    b_ids, j_ids = _ids(tokenizer, bodies), _ids(tokenizer, [b + c for b, c in zip(bodies, conts)])
    out = []
    for i, (b, j) in enumerate(zip(b_ids, j_ids)):
        if len(j) <= len(b) or j[:len(b)] != b:
            raise ValueError(f"{what} {i}: the tokenizer does not split {conts[i][:40]!r} off "
                             f"{ANSWER_CUE!r} at a token boundary")
        out.append(j[len(b)])
    return out


def letter_token_ids(tokenizer, num_choices: int) -> torch.Tensor:
    """Vocab ids of the letters ``A..`` in the form they take after ``"Answer:"`` in the training
    text ``"Answer: A"``: ``" A"`` (``"ĠA"``) for byte-level BPE, ``"▁A"`` for SentencePiece,
    ``"a"`` for uncased WordPiece. Each letter must be exactly one token, and all distinct."""
    if not 1 <= num_choices <= 26:
        raise ValueError(f"num_choices must be in 1..26, got {num_choices}")
    letters = _letters(num_choices)
    base = _ids(tokenizer, [ANSWER_CUE])[0]
    joint = _ids(tokenizer, [f"{ANSWER_CUE}{ANSWER_SEP}{L}" for L in letters])
    out = []
    for L, j in zip(letters, joint):
        if j[:len(base)] != base or len(j) != len(base) + 1:
            raise ValueError(f"the tokenizer does not encode {ANSWER_SEP + L!r} after {ANSWER_CUE!r} "
                             f"as a single token ({len(j) - len(base)} tokens)")
        out.append(j[-1])
    if len(set(out)) != len(out):
        raise ValueError(f"letters {letters} map to repeated token ids {out}")
    return torch.tensor(out, dtype=torch.int64)


def encode_next_token(tokenizer, prompts: Sequence[str], answers: Sequence[str], max_len: int,
                      num_choices: int | None = None) -> NextTokenEncoding:
    """Tokenise ``prompt + "Answer:"`` for next-token classification.

    ``prompts`` are the formatted prompts without the cue (a prompt that already ends with
    ``"Answer:"``/``"Answer: "`` is accepted as is). Rows are cut from the LEFT to ``max_len``
    (the tokenizer's leading BOS/[CLS], if any, is kept) and left-padded with ``pad_token_id``
    (``eos_token_id`` when there is no pad token). ``labels[i]`` is the first token of
    ``" " + answers[i]`` as the tokenizer splits the training text ``"…Answer: {answer}"``: the
    letter for QA, the response's first token for Alpaca proxies. With ``num_choices`` the answers
    must be letters and ``choice_ids``/``label_choice`` allow an argmax restricted to the valid
    letters (:func:`choice_predictions`).
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token to left-pad with")
    prefix = _special_prefix(tokenizer)
    if max_len <= len(prefix):
        raise ValueError(f"max_len={max_len} leaves no room after {len(prefix)} leading special tokens")
    bodies = []
    for p in prompts:
        s = p.rstrip(" ")
        bodies.append(s if s.endswith(ANSWER_CUE) else p + ANSWER_CUE)
    for i, a in enumerate(answers):
        if not isinstance(a, str) or not a.strip():
            raise ValueError(f"answer {i} is empty")
    labels = _continuations(tokenizer, bodies, [ANSWER_SEP + a for a in answers], "answer")
    choice_ids = label_choice = None
    if num_choices is not None:
        choice_ids = letter_token_ids(tokenizer, num_choices)
        letters = _letters(num_choices)
        bad = [i for i, a in enumerate(answers) if a not in letters]
        if bad:
            raise ValueError(f"answer {bad[0]} = {answers[bad[0]]!r} is not one of {letters}")
        label_choice = torch.tensor([letters.index(a) for a in answers], dtype=torch.int64)
        expect = choice_ids[label_choice].tolist()
        if expect != labels:
            i = next(k for k, (x, y) in enumerate(zip(expect, labels)) if x != y)
            raise ValueError(f"answer {i}: the letter token after this prompt ({labels[i]}) differs "
                             f"from the canonical one ({expect[i]})")
    n = len(bodies)
    ids = torch.full((n, max_len), pad, dtype=torch.int64)
    mask = torch.zeros((n, max_len), dtype=torch.int64)
    room, cut = max_len - len(prefix), 0
    for i, b in enumerate(_ids(tokenizer, bodies)):
        if len(b) > room:
            b, cut = b[-room:], cut + 1
        row = prefix + b
        ids[i, max_len - len(row):] = torch.tensor(row, dtype=torch.int64)
        mask[i, max_len - len(row):] = 1
    return NextTokenEncoding(ids, mask, torch.tensor(labels, dtype=torch.int64), choice_ids,
                             label_choice, cut)


def choice_predictions(logits: torch.Tensor, choice_ids: torch.Tensor) -> torch.Tensor:
    """Argmax over the valid letters only: ``logits`` [N, V] (last position) -> [N] letter index
    (compare with ``NextTokenEncoding.label_choice``)."""
    return logits[:, choice_ids.to(logits.device)].argmax(dim=-1)


# ----------------------------------------------------------------------------- benchmark


def build_hf_qa_benchmark(tokenizer, max_len: int, domains: Sequence[str] = DOMAINS,
                          max_train: int = 10_000, max_test: int = -1, max_pool: int = -1,
                          data_dir: str = ""):
    """The paper's NLP benchmark: QA client domains (train: the first ``max_train`` rows of the
    train split; test: the validation split) and Alpaca as the public pool, tokenised for
    next-token classification with a causal LM (:func:`encode_next_token`).

    ``data_dir`` holds local files in the hub schemas (``<domain>/{train,validation}.*`` and
    ``alpaca/train.*``); empty: the HF hub. Labels are vocabulary ids (answer letters; the first
    response token for Alpaca), each domain evaluated over its own letters.
    """
    from metamoe.data.vision import Domain, VisionBenchmark

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
        doms.append(Domain(dom, etr.input_ids.numpy(), etr.labels.numpy(), ete.input_ids.numpy(),
                           ete.labels.numpy(), [int(c) for c in etr.choice_ids],
                           f"{dom} ({tr.source}), {k} choices"))
    pool = load_alpaca(lim(max_pool), src("alpaca"))
    enc = encode_next_token(tokenizer, pool.prompts, [r if r.strip() else "." for r in
                                                      pool.responses], max_len)
    names = [str(t) for t in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))]
    return VisionBenchmark("hf_qa", doms, enc.input_ids.numpy(), enc.labels.numpy(),
                           np.asarray(["alpaca"] * len(pool)), class_names=names)
