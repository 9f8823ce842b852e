"""A tiny, randomly initialised CLIP saved to a directory, made offline (no hub download).

``make_tiny_clip(directory)`` writes what ``CLIPModel``, ``AutoTokenizer``, ``CLIPProcessor``
and ``CLIPImageProcessor`` ``from_pretrained(directory)`` read: the model (HF's own CLIP test
sizes, float32, safetensors, ``torch.manual_seed(0)``), a real CLIP BPE tokenizer over a
99-token vocabulary written here (``vocab.json`` + ``merges.txt``) and a
``preprocessor_config.json`` (30x30 images, CLIP's mean/std).

Vocabulary (ids in this order): ``a``..``z``, ``a</w>``..``z</w>``, ``0</w>``..``9</w>``,
some punctuation, ``<|unk|>`` (so unknown characters never look like the end of the text),
the merge results of ``MERGES``, then ``<|startoftext|>`` = 97 and ``<|endoftext|>`` = 98 (also
the pad token, as in OpenAI's CLIP tokenizers). The text config's bos/eos/pad ids are these
ids, so HF's text pooling at the eos token picks the real end of each text.

Import as ``from tests.clip_fixture import make_tiny_clip`` (see ``tests/local_data.py``).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

__all__ = ["BOS", "EOS", "MERGES", "PAD", "UNK", "VOCAB", "make_tiny_clip", "tiny_clip_config"]

BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<|unk|>"
PAD = EOS
# ordered by rank; every result is in the vocabulary (CLIP BPE, words end with "</w>")
MERGES = [
    ("t", "h"), ("th", "e</w>"), ("i", "s</w>"), ("th", "is</w>"), ("o", "f</w>"), ("p", "h"),
    ("ph", "o"), ("t", "o</w>"), ("pho", "to</w>"), ("i", "n"), ("in", "g</w>"), ("e", "r"),
    ("a", "n"), ("an", "d</w>"), ("o", "n</w>"), ("r", "e"), ("e", "n"), ("a", "t</w>"),
    ("e", "d</w>"), ("o", "r"), ("a", "l"), ("l", "e</w>"),
]
_PUNCT = [".", ".</w>", ",", ",</w>", "'", "'</w>", "-", "-</w>", "!</w>", "?</w>", "(", ")</w>"]
VOCAB: dict[str, int] = {
    tok: i for i, tok in enumerate(
        list(string.ascii_lowercase) + [c + "</w>" for c in string.ascii_lowercase]
        + [d + "</w>" for d in string.digits] + _PUNCT + [UNK] + [a + b for a, b in MERGES]
        + [BOS, EOS])
}
VOCAB_SIZE = 99
assert len(VOCAB) == VOCAB_SIZE and VOCAB[EOS] == VOCAB_SIZE - 1
assert all(a in VOCAB and b in VOCAB for a, b in MERGES)

# CLIP's normalisation (openai/clip-vit-base-patch32's preprocessor_config.json)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGE_SIZE = 30


def tiny_clip_config():
    """``CLIPConfig`` with the sizes of HF's CLIP model tests and this vocabulary's ids."""
    from transformers import CLIPConfig

    text = dict(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=37, max_position_embeddings=77,
                projection_dim=32, bos_token_id=VOCAB[BOS], eos_token_id=VOCAB[EOS],
                pad_token_id=VOCAB[PAD])
    vision = dict(image_size=IMAGE_SIZE, patch_size=2, num_channels=3, hidden_size=32,
                  num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                  projection_dim=32)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)


def _write_tokenizer(directory: Path) -> None:
    from transformers import CLIPTokenizer

    (directory / "vocab.json").write_text(json.dumps(VOCAB, indent=1), encoding="utf-8")
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES), encoding="utf-8")
    specials = dict(unk_token=UNK, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                    model_max_length=77, tokenizer_class="CLIPTokenizer")
    (directory / "tokenizer_config.json").write_text(json.dumps(specials), encoding="utf-8")
    # read back from vocab.json/merges.txt (transformers 4.x and 5.x), then saved in full
    # (5.x adds tokenizer.json)
    CLIPTokenizer.from_pretrained(str(directory)).save_pretrained(str(directory))


def make_tiny_clip(directory) -> Path:
    """Write the tiny CLIP (model, tokenizer, image processor) into ``directory``; return it."""
    import torch
    from transformers import CLIPImageProcessor, CLIPModel

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = CLIPModel(tiny_clip_config()).to(torch.float32).eval()
    model.save_pretrained(str(directory), safe_serialization=True)
    _write_tokenizer(directory)
    CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True, do_resize=True, do_normalize=True, do_convert_rgb=True,
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    ).save_pretrained(str(directory))
    return directory
