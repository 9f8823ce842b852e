"""tests/clip_fixture.py: a tiny random CLIP that loads offline with the usual HF classes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.clip_fixture import BOS, EOS, UNK, VOCAB, make_tiny_clip  # noqa: E402

SENTENCE = "This is a photo of a golden retriever."


def _features(out) -> torch.Tensor:
    """transformers 4.x returns the projected tensor, 5.x an output with ``.pooler_output``."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


def test_files_and_config(clip_dir):
    names = {p.name for p in clip_dir.iterdir()}
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt",
            "tokenizer_config.json", "preprocessor_config.json"} <= names
    assert not any(n.endswith(".bin") for n in names)
    cfg = transformers.CLIPConfig.from_pretrained(clip_dir)
    t, v = cfg.text_config, cfg.vision_config
    assert (t.vocab_size, t.hidden_size, t.num_hidden_layers, t.num_attention_heads,
            t.intermediate_size, t.max_position_embeddings) == (99, 32, 2, 4, 37, 77)
    assert (v.image_size, v.patch_size, v.hidden_size, v.num_hidden_layers,
            v.num_attention_heads, v.intermediate_size) == (30, 2, 32, 2, 4, 37)
    assert cfg.projection_dim == 32
    assert (t.bos_token_id, t.eos_token_id, t.pad_token_id) == (97, 98, 98)
    pre = json.loads((clip_dir / "preprocessor_config.json").read_text())
    assert pre["size"] == {"shortest_edge": 30} and pre["crop_size"] == {"height": 30, "width": 30}


def test_tokenizer(clip_dir):
    tok = transformers.AutoTokenizer.from_pretrained(clip_dir)
    assert "CLIPTokenizer" in type(tok).__name__
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (BOS, EOS, EOS, UNK)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (97, 98, 98)
    assert len(tok) == len(VOCAB) == 99
    ids = tok(SENTENCE)["input_ids"]
    assert ids[0] == 97 and ids[-1] == 98 and max(ids) < 99
    assert tok.unk_token_id not in ids and 98 not in ids[:-1]
    toks = tok.convert_ids_to_tokens(ids)
    assert toks[1:7] == ["this</w>", "is</w>", "a</w>", "photo</w>", "of</w>", "a</w>"]
    assert toks[-2] == ".</w>"
    assert tok.decode(ids, skip_special_tokens=True) == "this is a photo of a golden retriever ."
    odd = tok("héllo 42 it's")["input_ids"]  # é is unknown: the unk id, never the eos id
    assert tok.unk_token_id in odd and odd.count(98) == 1 and max(odd) < 99
    batch = tok([SENTENCE, "a dog"], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape[0] == 2 and batch["attention_mask"][1].sum() == 6  # bos a d o g eos


def test_model_features(clip_dir):
    tok = transformers.AutoTokenizer.from_pretrained(clip_dir)
    model = transformers.CLIPModel.from_pretrained(clip_dir).eval()
    assert next(model.parameters()).dtype == torch.float32
    with torch.no_grad():
        batch = tok([SENTENCE, "a dog"], padding=True, return_tensors="pt")
        text = _features(model.get_text_features(**batch))
        alone = _features(model.get_text_features(**tok(["a dog"], return_tensors="pt")))
        img = _features(model.get_image_features(pixel_values=torch.randn(2, 3, 30, 30)))
    assert text.shape == (2, 32) and img.shape == (2, 32)
    assert torch.isfinite(text).all() and torch.isfinite(img).all()
    # pooled at the real eos: padding does not change a text's features
    torch.testing.assert_close(text[1:], alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(text[0], text[1])


def test_processor_and_seeded(clip_dir, tmp_path):
    from PIL import Image

    proc = transformers.CLIPProcessor.from_pretrained(clip_dir)
    image_proc = transformers.CLIPImageProcessor.from_pretrained(clip_dir)
    rgb = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    out = proc(text=["a photo of a cat"], images=[Image.fromarray(rgb)], return_tensors="pt",
               padding=True)
    assert out["pixel_values"].shape == (1, 3, 30, 30) and out["input_ids"][0, -1] == 98
    px = image_proc(images=Image.fromarray(rgb), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(px, out["pixel_values"])
    again = make_tiny_clip(tmp_path / "again")
    a = transformers.CLIPModel.from_pretrained(clip_dir).state_dict()
    b = transformers.CLIPModel.from_pretrained(again).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
