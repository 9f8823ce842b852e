"""Loading the NLP setting's datasets through Hugging Face ``datasets``, from the Hub or local files.

This module holds the Hub repo ids (with the script-free mirrors tried when a repo still ships a
loading script), the formatted containers :class:`QASplit` (one split of one QA domain) and
:class:`AlpacaPool` (the public pool), the local-file lookup (a file, or a directory of
``{split}.jsonl|json|parquet|csv``), and the two loaders :func:`load_qa_domain` and
:func:`load_alpaca`, which read rows in the hub schema and format them with
:mod:`metamoe.data.qa_format`. ``datasets`` is imported only when a loader runs
(``pip install metamoe-fl[hf]``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from metamoe.data.qa_format import (
    _FORMATTERS,
    NUM_CHOICES,
    QAItem,
    _field,
    alpaca_negative_text,
    alpaca_prompt,
    alpaca_text,
    canonical_domain,
    relevance_text,
    train_text,
)

__all__ = ["ALPACA_HUB_ID", "HUB_IDS", "HUB_MIRRORS", "AlpacaPool", "QASplit", "load_alpaca", "load_qa_domain"]

log = logging.getLogger(__name__)

HUB_IDS = {
    "commonsense_qa": "tau/commonsense_qa",
    "cosmos_qa": "allenai/cosmos_qa",
    "social_i_qa": "allenai/social_i_qa",
}
ALPACA_HUB_ID = "tatsu-lab/alpaca"

# Script-free mirrors tried when a Hub repo still ships a loading script (datasets >= 4 refuses
# those). lighteval/siqa: same rows and columns as allenai/social_i_qa (train 33410 /
# validation 1954), checked by content hash in EleutherAI/lm-evaluation-harness PR #3943.
HUB_MIRRORS = {"social_i_qa": ("lighteval/siqa",)}


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
