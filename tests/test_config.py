"""Configuration: bad keys/values fail before training, naming the key."""

import pytest

from metamoe.config import ConfigError, num_clients, resolve_config


def test_defaults_resolve():
    cfg = resolve_config({})
    assert cfg.method == "metamoe" and cfg.benchmark.name == "vision"
    assert num_clients(cfg) == 3


def test_overrides_and_experiment_apply():
    cfg = resolve_config({"benchmark": "tiny", "experiment": "no_rw_dpp",
                          "overrides": "expert.epochs=3 select.m=20", "seed": 4})
    assert cfg.select.method == "relevance"
    assert cfg.expert.epochs == 3 and cfg.select.m == 20 and cfg.run.seed == 4


@pytest.mark.parametrize("overrides, key", [
    ("expert.epoch=3", "expert.epoch"),          # mistyped key
    ("unify.lambda_int=0.5", "unify.lambda_int"),
    ("nonsense=1", "nonsense"),
    ("expert.epochs=three", "expert.epochs"),    # mistyped value
])
def test_unknown_or_mistyped_keys_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        resolve_config({"overrides": overrides})


@pytest.mark.parametrize("overrides, key", [
    ("unify.context=global", "unify.context"),
    ("select.method=best", "select.method"),
    ("select.m=5000", "select.m"),
    ("unify.lambda_init=1.5", "unify.lambda_init"),
    ("model.heads=5", "model.dim"),
    ("unify.top_k=4", "unify.top_k"),
])
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        resolve_config({"overrides": overrides})


def test_unknown_selectors_and_run_config_keys():
    with pytest.raises(ConfigError, match="unknown benchmark 'imagenet'"):
        resolve_config({"benchmark": "imagenet"})
    with pytest.raises(ConfigError, match="unknown method"):
        resolve_config({"method": "fedsomething"})
    with pytest.raises(ConfigError, match="num-rounds"):
        resolve_config({"num-rounds": 3})
    with pytest.raises(ConfigError, match="not of the form"):
        resolve_config({"overrides": "expert.epochs"})


def test_resolved_config_is_read_only():
    cfg = resolve_config({})
    from omegaconf.errors import ReadonlyConfigError

    with pytest.raises(ReadonlyConfigError):
        cfg.expert.epochs = 100


@pytest.mark.parametrize("method", ["fedavg", "fedavg_moe", "fedalign_moe", "ddome"])
def test_benchmark_sets_the_fl_budget_methods_do_not_override_it(method):
    """Method files describe the method; the benchmark file's fl budget (rounds, epochs, lr)
    applies, and without one the schema default (4 x 2) does. A benchmark's recipe (chosen on
    val) may set a row's rounds; its passes over Dp stay rounds x epochs = expert.epochs."""
    tiny = resolve_config({"benchmark": "tiny", "method": method})
    assert (tiny.fl.rounds, tiny.fl.epochs) == (2, 1)
    k60 = resolve_config({"benchmark": "vision_k60", "method": method})
    assert (k60.fl.rounds, k60.fl.epochs, k60.fl.lr) == (4, 2, 3e-3)
    vision = resolve_config({"benchmark": "vision", "method": method})
    rounds = {"fedavg": 16, "fedavg_moe": 8, "fedalign_moe": 16, "ddome": 8}[method]
    assert (vision.fl.rounds, vision.fl.rounds * vision.fl.epochs, vision.fl.lr) == \
        (rounds, vision.expert.epochs, 3e-3)
    text = resolve_config({"benchmark": "text", "method": method})
    assert (text.fl.rounds, text.fl.rounds * text.fl.epochs) == \
        ({"ddome": 8}.get(method, 16), text.expert.epochs)
    # text_k60 inherits text's recipes but keeps its FL rows at 2 rounds (clients of 40 texts)
    assert resolve_config({"benchmark": "text_k60", "method": method}).fl.rounds == 2


def test_the_flower_app_declares_every_run_config_key():
    """Flower refuses a --run-config key the app's pyproject.toml does not declare, so every
    key resolve_config reads must be declared there (and nothing else)."""
    import tomllib
    from pathlib import Path

    from metamoe.config import RUN_CONFIG_KEYS

    root = Path(__file__).resolve().parents[1]
    app = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(app) == RUN_CONFIG_KEYS


def test_a_benchmarks_recipes_apply_to_their_method_only(tmp_path, monkeypatch):
    """``recipes:`` in a benchmark file: a method's own settings on that benchmark (chosen on
    val), merged over the method's file; MetaMoE's reach its suite and the same-start bound;
    experiments and overrides still win; an unknown method is refused, named."""
    import shutil

    import metamoe.config.resolve as res

    conf = tmp_path / "conf"
    shutil.copytree(res.conf_dir(), conf)
    (conf / "benchmark" / "rtest.yaml").write_text(
        "extends: tiny\nbenchmark:\n  name: rtest\nrecipes:\n"
        "  metamoe:\n    unify: {lambda_init: 1.0, router_score: euclidean}\n"
        "  flexolmo:\n    unify: {top_k: 2}\n")
    monkeypatch.setattr(res, "conf_dir", lambda: conf)

    def unify(method, **kw):
        return resolve_config({"benchmark": "rtest", "method": method, **kw}).unify

    for m in ("metamoe", "metamoe_suite", "unrestricted_moe_same_start"):
        assert (unify(m).lambda_init, unify(m).router_score) == (1.0, "euclidean"), m
    assert (unify("flexolmo").top_k, unify("flexolmo").router_score) == (2, "dot")
    assert (unify("btm").lambda_init, unify("btm").top_k) == (0.3, 1)
    assert unify("metamoe", experiment="lambda1_euclid").lambda_init == 1.0
    assert unify("metamoe", overrides="unify.lambda_init=0.5").lambda_init == 0.5
    assert unify("metamoe", experiment="no_ca_router").context == "none"  # experiment wins
    (conf / "benchmark" / "rbad.yaml").write_text("extends: tiny\nrecipes:\n  metamo: {}\n")
    with pytest.raises(ConfigError, match=r"rbad.yaml: recipes for unknown method\(s\) \['metamo'\]"):
        resolve_config({"benchmark": "rbad"})
    (conf / "benchmark" / "rkey.yaml").write_text(
        "extends: tiny\nrecipes:\n  metamoe:\n    unify: {lambda: 1.0}\n")
    with pytest.raises(ConfigError, match="recipes.metamoe"):
        resolve_config({"benchmark": "rkey"})
