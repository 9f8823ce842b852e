"""Published comparisons: the tables and plots under ``docs/results/<bench>/`` and, beside them,
every run they were read from (``runs/<name>.json``: the run's ``metrics.json``, which records
its resolved config, commit and machine).

A published comparison can be taken up again on another machine: ``--reuse-published DIR``
(``metamoe.compare``, ``bench.fl_rounds``) puts each published run back as a finished run, so
only the runs not yet published are launched and the tables are rebuilt from the same files.
Run ids hash the resolved config, not the code: reuse runs only with the code that made them
(each file names its commit).

A comparison that spans machines or sessions is published as it goes, finished runs only:
``python -m metamoe.compare_publish results/tables-text/runs docs/results/text/runs``
(``make publish-runs BENCH=text``) adds every finished run's ``metrics.json`` and removes none.

A published table's plots are redrawn from its ``table.json`` alone, no run needed:
``python -m metamoe.compare_publish --replot docs/results/vision``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

TABLES = ("table.json", "table.md", "compare.json", "accuracy_per_domain.png",
          "accuracy_vs_upload.png")


def publish_tables(out: Path, dest: Path, files: tuple[str, ...] = TABLES) -> list[Path]:
    """Copy a comparison's tables and plots (``files`` of ``out``; a sweep names its own) to
    ``dest`` (docs/results/<benchmark>/)."""
    dest.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy2(out / f, dest / f)) for f in files if (out / f).exists()]


def publish_runs(run_dirs: dict[str, Path], dest: Path, keep_others: bool = False
                 ) -> list[Path]:
    """Copy each finished run's ``metrics.json`` ({name: run dir}) to ``dest/<name>.json``;
    ``dest`` then holds exactly these runs (files of runs no longer in the table go), or, with
    ``keep_others``, these runs besides those already published."""
    dest.mkdir(parents=True, exist_ok=True)
    if not keep_others:
        for old in dest.glob("*.json"):
            if old.stem not in run_dirs:
                old.unlink()
    return [Path(shutil.copy2(d / "metrics.json", dest / f"{name}.json"))
            for name, d in sorted(run_dirs.items()) if (d / "metrics.json").exists()]


def take_published_runs(src: Path, runs_dir: Path, prefix: str = "") -> list[str]:
    """Put each published run ``src/<prefix><run id>.json`` back as
    ``runs_dir/<run id>/metrics.json`` where that run has none yet; returns the run ids taken.
    A missing ``src`` is an error (a mistyped folder would otherwise rerun everything)."""
    if not src.is_dir():
        raise FileNotFoundError(f"--reuse-published: no folder of published runs at {src}")
    taken = []
    for f in sorted(src.glob(f"{prefix}*.json")):
        rid = f.stem[len(prefix):]
        target = runs_dir / rid / "metrics.json"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
            taken.append(rid)
    return taken


def publish_finished_runs(runs_dir: Path, dest: Path) -> tuple[list[Path], list[str]]:
    """Add every finished run under ``runs_dir`` (``<run id>/metrics.json``) to ``dest`` as
    ``<run id>.json``, keeping the files already there; returns (files written, run ids with no
    metrics.json: killed or running, not published)."""
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"no folder of runs at {runs_dir}")
    runs = [d for d in sorted(runs_dir.iterdir()) if d.is_dir()]
    finished = {d.name: d for d in runs if (d / "metrics.json").exists()}
    return (publish_runs(finished, dest, keep_others=True),
            [d.name for d in runs if d.name not in finished])


def replot(dest: Path) -> list[Path]:
    """Redraw the plots of the comparison published in ``dest`` from its ``table.json`` (and
    the split named in its ``compare.json``): the same figures ``metamoe.compare`` draws."""
    from metamoe.compare_tables import measured_rows, write_plots

    path = dest / "table.json"
    if not path.is_file():
        raise FileNotFoundError(f"--replot: no table.json in {dest}")
    table = measured_rows(json.loads(path.read_text()))
    meta = dest / "compare.json"
    split = json.loads(meta.read_text()).get("split", "test") if meta.is_file() else "test"
    domains = list(next(iter(table.values()))["per_domain"]) if table else []
    return write_plots(dest, table, domains, split)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Publish a comparison's finished runs so far, or "
                                             "redraw a published comparison's plots.")
    ap.add_argument("runs_dir", type=Path, nargs="?",
                    help="a comparison's runs folder (results/.../runs)")
    ap.add_argument("dest", type=Path, nargs="?",
                    help="published runs folder (docs/results/<bench>/runs)")
    ap.add_argument("--replot", type=Path, metavar="DIR",
                    help="redraw the plots of the comparison published in DIR from its "
                         "table.json (docs/results/<bench>)")
    a = ap.parse_args(argv)
    if a.replot is not None:
        if a.runs_dir is not None:
            ap.error("--replot takes no runs folder")
        for p in replot(a.replot):
            print(f"wrote {p}")
        return
    if a.dest is None:
        ap.error("give the runs folder and the published runs folder, or --replot DIR")
    written, unfinished = publish_finished_runs(a.runs_dir, a.dest)
    print(f"published {len(written)} finished runs to {a.dest}; "
          f"{len(unfinished)} unfinished left out: {', '.join(unfinished) or 'none'}")


if __name__ == "__main__":
    main()
