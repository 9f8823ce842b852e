"""The paper's vision seed, offline: a tiny random CLIP (HF's test sizes) saved to a temp dir.
The re-expressed CLIP gives transformers' own features and zero-shot logits; its MoE with every
token forced to M0's FFN is M0; and the whole pipeline runs end to end in Flower's simulation on
generated image sets in the hub schema (save_to_disk), the CoOp split format and an image folder,
and the emitted CLIP MoE loads with load_moe and gives the reported accuracy."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metamoe import load_moe
from metamoe.clients.node import _local_node, localize
from metamoe.config import resolve_config
from metamoe.data import load_benchmark
from metamoe.data.local import LazyInputs
from metamoe.launch import launch
from metamoe.models.clip import CLIPClassifier, CLIPSeedConfig, clip_transform
from metamoe.models.moe import M0_FFN, MoEConfig, moe_from_seed
from metamoe.server.seed import get_seed_model
from metamoe.training import accuracy
from tests.clip_fixture import make_tiny_clip
from tests.local_data import write_coop, write_hf, write_imagefolder

NAMES = ["golden retriever", "tabby cat", "red tulip", "sea", "forest", "desert"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def _hf_out(x):
    return x if isinstance(x, torch.Tensor) else x.pooler_output


def test_reexpressed_clip_equals_transformers(tiny_clip):
    from transformers import AutoTokenizer, CLIPModel

    ref = CLIPModel.from_pretrained(tiny_clip).eval()
    tok = AutoTokenizer.from_pretrained(tiny_clip)
    ours = CLIPClassifier(CLIPSeedConfig(encoder=str(tiny_clip), num_classes=len(NAMES))).eval()
    ours.set_class_head(NAMES)
    assert ours.cfg.image_size == 30 and ours.cfg.depth == 2 and ours.cfg.fingerprint
    assert all(f.act_name == "quick_gelu" for f in ours.ffn_layers())
    x = torch.randn(4, 3, 30, 30, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = ref.vision_model(pixel_values=x).pooler_output
        assert torch.allclose(ours.forward_features(x), feats, atol=1e-5)
        img = F.normalize(_hf_out(ref.get_image_features(pixel_values=x)), dim=-1)
        assert torch.allclose(ours.image_embedding(x), img, atol=1e-5)
        enc = tok([f"This is a photo of a {n}." for n in NAMES], padding=True,
                  return_tensors="pt")
        logits = ref(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                     pixel_values=x).logits_per_image
        assert torch.allclose(ours(x), logits, atol=1e-5)
        # the MoE on it, every token forced through M0's own FFN, is M0
        moe = moe_from_seed(ours, MoEConfig(num_experts=2, rank=2, alpha=4.0))
        moe.set_forced(M0_FFN)
        assert torch.allclose(moe(x), ours(x), atol=1e-6)
    # only the head travels: the public checkpoint is loaded on every node
    shipped = set(ours.state_dict()) - ours.public_keys()
    assert shipped == {"head.weight", "head.bias"}


def test_clip_transform_is_the_papers():
    from PIL import Image

    tf = clip_transform(224)
    x = tf(Image.new("L", (500, 300), 128))
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    assert np.allclose(x[0], (128 / 255 - 0.48145466) / 0.26862954, atol=1e-3)
    aug = clip_transform(30, train=True)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), np.uint8))
    a, b = aug(img, np.random.default_rng(1)), aug(img, np.random.default_rng(1))
    assert a.shape == (3, 30, 30) and np.array_equal(a, b)  # seeded crops and flips
    assert not all(np.array_equal(a, aug(img, np.random.default_rng(s))) for s in range(2, 6))


def _images(n: int, classes: int, seed: int, size: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Grey images whose brightness pattern depends on the class."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.integers(0, 40, size=(n, size, size)).astype(np.uint8)
    for i, c in enumerate(y):
        x[i, :, (c * size // classes):((c + 1) * size // classes)] = 230
    return x, y


@pytest.mark.slow
def test_tiny_clip_pipeline_end_to_end(tiny_clip, tmp_path, monkeypatch, cache_dir):
    monkeypatch.setenv("METAMOE_FLWR_HOME", str(tmp_path / "flwr-home"))
    px, py = _images(120, 6, 0)
    pool = write_imagefolder(tmp_path / "pool", px, py, NAMES)
    ax, ay = _images(80, 4, 1)
    hub = write_hf(tmp_path / "pets", ax[:60], ay[:60], ["beagle", "pug", "sphynx", "bengal"],
                   test=(ax[60:], ay[60:]))
    bx, by = _images(90, 3, 2)
    idx = np.arange(90)
    coop = write_coop(tmp_path / "flowers", bx, by, ["rose", "daisy", "iris"],
                      splits={"train": idx[:60], "val": idx[60:70], "test": idx[70:]})
    cx, cy = _images(80, 5, 3)
    folder = write_imagefolder(tmp_path / "sat", cx, cy, ["river", "highway", "pasture",
                                                          "industrial", "residential"])
    overrides = (f"model.encoder={tiny_clip} benchmark.client_data=[{hub},{coop},{folder}] "
                 f"benchmark.pool_data={pool}")
    run_dir = launch(benchmark="tiny_clip", overrides=overrides, cache_dir=cache_dir,
                     output_dir=str(tmp_path / "results"), run_id="clip-e2e", timeout=900)
    m = json.loads((run_dir / "metrics.json").read_text())
    assert not m["rejected"] and not m["missing"]
    assert set(m["accuracy"]["per_domain"]) == {"client-0", "client-1", "client-2"}
    assert m["config"]["model"]["arch"] == "clip"
    text = (run_dir / "metrics.json").read_text() + (run_dir / "report.md").read_text()
    for secret in ("beagle", "daisy", "pasture"):  # the clients' class names stay on them
        assert secret not in text

    # The emitted CLIP MoE loads with one call and, with a client's own class-name rows
    # (made from its names on its node), gives exactly the accuracy that client reported.
    cfg = resolve_config({"benchmark": "tiny_clip", "overrides": overrides,
                          "cache-dir": cache_dir})
    bench = load_benchmark(cfg)
    seed, _, _ = get_seed_model(cfg, bench)
    moe = load_moe(run_dir)
    assert type(moe).__name__ == "MoECLIP"
    for i in range(3):
        node = _local_node(cfg, i, bench, {})
        local = localize(node, copy.deepcopy(moe), seed)
        d = node.domain
        # CLIP-sized client data stay on disk, decoded per batch (augmented for training)
        assert isinstance(d.x_test, LazyInputs) and isinstance(d.x_train_aug, LazyInputs)
        acc = accuracy(local, d.x_test, d.y_test, d.classes)
        assert np.isclose(acc, m["accuracy"]["per_domain"][f"client-{i}"], atol=1e-9)
