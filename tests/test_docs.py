"""The documentation: a short README with the quick start, links that resolve, and figures that
``scripts/figures.py`` regenerates from the committed result files."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FIGURES = ROOT / "docs" / "figures"
IMAGE_EXT = (".png", ".svg", ".jpg", ".jpeg", ".gif")


def doc_files() -> list[Path]:
    files = [README, *sorted((ROOT / "docs").rglob("*.md"))]
    bench = ROOT / "bench" / "README.md"
    if bench.exists():
        files.append(bench)
    return files


FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"(!?)\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def links(path: Path) -> list[tuple[bool, str]]:
    """(is_image, target) of every markdown link outside code blocks and code spans."""
    text = INLINE_CODE.sub("", FENCE.sub("", path.read_text(encoding="utf-8")))
    return [(bang == "!", target) for bang, target in LINK.findall(text)]


def is_external(target: str) -> bool:
    return re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) is not None  # http:, https:, mailto:


def resolve(doc: Path, target: str) -> Path:
    path = target.split("#", 1)[0]
    return (ROOT / path.lstrip("/")) if path.startswith("/") else (doc.parent / path)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = text.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for h in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        s = slug(h)
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def test_readme_is_short_and_has_the_quick_start():
    text = README.read_text(encoding="utf-8")
    n = len(text.splitlines())
    assert n <= 250, f"README.md has {n} lines (at most 250): move details to docs/"
    for cmd in ("make demo", "make test"):
        assert re.search(rf"^{cmd}\b", text, re.M), f"README.md lacks the quick-start line {cmd!r}"


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path):
    missing = []
    for _, target in links(doc):
        if is_external(target) or target.startswith("#"):
            continue
        if not resolve(doc, target).exists():
            missing.append(target)
    assert not missing, f"{doc.relative_to(ROOT)}: links to missing files {missing}"


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_anchors_resolve(doc: Path):
    """``file.md#section`` and ``#section`` links point at a heading that exists."""
    bad = []
    for _, target in links(doc):
        if is_external(target) or "#" not in target:
            continue
        path, anchor = target.split("#", 1)
        dest = doc if not path else resolve(doc, target)
        if dest.suffix == ".md" and dest.exists() and anchor not in anchors(dest):
            bad.append(target)
    assert not bad, f"{doc.relative_to(ROOT)}: links to missing headings {bad}"


def test_images_live_in_docs_figures():
    wrong = []
    for doc in doc_files():
        for is_image, target in links(doc):
            if not is_image or is_external(target):
                continue
            path = resolve(doc, target).resolve()
            if path.parent != FIGURES.resolve() or not path.exists():
                wrong.append(f"{doc.relative_to(ROOT)}: {target}")
    assert not wrong, f"images must be committed under docs/figures/: {wrong}"


def test_figures_script_regenerates_every_committed_image(tmp_path: Path):
    committed = sorted(p.name for p in FIGURES.iterdir() if p.suffix.lower() in IMAGE_EXT)
    assert committed, "docs/figures/ holds no image"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "figures.py"),
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    written = sorted(p.name for p in tmp_path.iterdir())
    missing = sorted(set(committed) - set(written))
    assert not missing, f"scripts/figures.py did not regenerate {missing}:\n{proc.stdout}"
    extra = sorted(set(written) - set(committed))
    assert not extra, f"run `make figures` and commit docs/figures/{extra}"
    # deterministic images: the committed ones are exactly what the script draws today
    stale = [n for n in committed if (tmp_path / n).read_bytes() != (FIGURES / n).read_bytes()]
    assert not stale, f"docs/figures/{stale} differ from the result files: run `make figures`"


def test_the_committed_text_dp_table_is_what_its_runs_give(tmp_path):
    """docs/results/text/dp_table.json is scripts/dp_table.py's aggregate of the committed run
    records next to it: three seeds per ε, totals ε = 1, 4, 8 met per client."""
    out = tmp_path / "dp_table.json"
    proc = subprocess.run([sys.executable, "scripts/dp_table.py", "docs/results/text/dp_runs",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(out.read_text())
    assert got == json.loads((ROOT / "docs/results/text/dp_table.json").read_text())
    for eps in (1, 4, 8):
        row = got[f"metamoe[dp_eps{eps}]"]
        assert row["seeds"] == 3 and row["privacy_total_epsilon"] == [eps]
