"""Tokenising QA prompts for next-token classification with a causal LM.

This module holds :class:`NextTokenEncoding` and :func:`encode_next_token`, which tokenise
``prompt + "Answer:"`` left-truncated and left-padded so that the logits at the last position
score the answer's first token, :func:`letter_token_ids` (the vocab ids of the answer letters in
the form they take after the cue) and :func:`choice_predictions` (the argmax restricted to a
domain's letters), plus the small tokenizer helpers they share.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from metamoe.data.qa_format import ANSWER_CUE, ANSWER_SEP, _letters

__all__ = ["NextTokenEncoding", "choice_predictions", "encode_next_token", "letter_token_ids"]


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
