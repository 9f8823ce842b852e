"""Write an embedded vision benchmark to disk in the layouts ``kind: local`` reads.

    python -m metamoe.data.export --benchmark tiny_learn --out /tmp/fed [--format imagefolder]

writes ``<out>/pool/<class>/<i>.png`` (the public pool with its class names) and, per domain,
``<out>/<domain>/train/<class>/*.png`` + ``test/`` (``--format imagefolder``) or a
``datasets.save_to_disk`` directory with ``train`` / ``test`` splits (``--format hf``), then
prints the command that runs MetaMoE on them. It shows the expected layout on real data, and
gives ``bench/private_head.py`` and the local-data tests a federation whose clients read
files. Class folder names are the benchmark's names with ``/`` replaced by ``-``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from metamoe.data.vision import MEAN, STD


def to_uint8(x: np.ndarray) -> np.ndarray:
    """The embedded benchmark's float [N, 1, H, W] images in [-1, 1] back to uint8 [N, H, W]."""
    return ((np.asarray(x)[:, 0] * STD + MEAN) * 255).round().clip(0, 255).astype(np.uint8)


def _folder_name(name: str) -> str:
    return name.replace("/", "-").strip() or "_"


def write_image_folder(root: Path, images: np.ndarray, labels: np.ndarray, names: list[str]
                       ) -> None:
    from PIL import Image

    for i, (img, y) in enumerate(zip(to_uint8(images), labels)):
        d = root / _folder_name(names[int(y)])
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(d / f"{i:06d}.png")


def write_hf(root: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], names: list[str]
             ) -> None:
    import datasets
    from PIL import Image

    feats = datasets.Features({"image": datasets.Image(),
                               "label": datasets.ClassLabel(names=names)})
    dd = datasets.DatasetDict({
        s: datasets.Dataset.from_dict({"image": [Image.fromarray(a, mode="L")
                                                 for a in to_uint8(x)],
                                       "label": [int(v) for v in y]}, features=feats)
        for s, (x, y) in splits.items()})
    dd.save_to_disk(str(root))


def export(benchmark: str, out: Path, fmt: str = "imagefolder", overrides: str = ""
           ) -> list[Path]:
    """Write ``benchmark``'s pool and domains under ``out``; returns the client paths."""
    from metamoe.config import resolve_config
    from metamoe.data import load_benchmark

    cfg = resolve_config({"benchmark": benchmark, "overrides": overrides})
    if cfg.benchmark.kind != "vision":
        raise SystemExit(f"--benchmark {benchmark}: only vision benchmarks can be exported")
    bench = load_benchmark(cfg)
    out.mkdir(parents=True, exist_ok=True)
    write_image_folder(out / "pool", bench.pool_x, bench.pool_y, bench.class_names)
    paths = []
    for d in bench.domains:
        names = [bench.class_names[c] for c in d.classes]
        local = {c: j for j, c in enumerate(d.classes)}
        ytr = np.array([local[int(v)] for v in d.y_train])
        yte = np.array([local[int(v)] for v in d.y_test])
        root = out / d.name
        if fmt == "hf":
            write_hf(root, {"train": (d.x_train, ytr), "test": (d.x_test, yte)}, names)
        else:
            write_image_folder(root / "train", d.x_train, ytr, names)
            write_image_folder(root / "test", d.x_test, yte, names)
        paths.append(root)
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--benchmark", default="tiny_learn")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--format", default="imagefolder", choices=["imagefolder", "hf"])
    ap.add_argument("--overrides", default="", help="applied to the benchmark's config")
    a = ap.parse_args(argv)
    paths = export(a.benchmark, a.out, a.format, a.overrides)
    clients = ",".join(str(p.resolve()) for p in paths)
    print(f"wrote {len(paths)} clients and the pool under {a.out}; run them with:\n"
          f"  python -m metamoe.launch --benchmark local --overrides "
          f"\"benchmark.client_data=[{clients}] benchmark.pool_data={(a.out / 'pool').resolve()}\"")


if __name__ == "__main__":
    main()
