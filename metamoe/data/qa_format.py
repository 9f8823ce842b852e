"""Schemas and text formats of the NLP setting's datasets: the three QA client domains and Alpaca.

This module holds the domain names and their aliases (:func:`canonical_domain`), the answer cue,
:class:`MalformedRowError`, the per-dataset row formatters that turn a hub-schema row into a
:class:`QAItem` (prompt without the cue, gold letter), and the texts built from a prompt: stage-1
relevance positives and Alpaca negatives, stage-2/3 training and proxy texts. The formats, and
where they come from in the authors' code, are described in :mod:`metamoe.data.hf_text`. Nothing
here reads files or tokenises.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ANSWER_CUE",
    "ANSWER_SEP",
    "DOMAINS",
    "NUM_CHOICES",
    "MalformedRowError",
    "QAItem",
    "alpaca_negative_text",
    "alpaca_prompt",
    "alpaca_text",
    "canonical_domain",
    "cue_text",
    "format_commonsense_qa",
    "format_cosmos_qa",
    "format_qa",
    "format_social_i_qa",
    "relevance_text",
    "train_text",
]

DOMAINS = ("commonsense_qa", "cosmos_qa", "social_i_qa")
NUM_CHOICES = {"commonsense_qa": 5, "cosmos_qa": 4, "social_i_qa": 3}
ANSWER_CUE = "Answer:"
# The separator between the cue and the answer in every training text ("Answer: A").
ANSWER_SEP = " "

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
