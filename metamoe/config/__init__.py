"""Configuration: a typed OmegaConf schema, YAML files under ``conf/``, Flower run_config.

Resolution order (later wins)::

    schema defaults  <-  conf/benchmark/<benchmark>.yaml  <-  conf/method/<method>.yaml
                     <-  the benchmark file's ``recipes.<method>`` (that method's settings on
                         that benchmark, chosen on val)
                     <-  conf/experiment/<experiment>.yaml  <-  run_config "overrides"
                     <-  run_config seed / run-id / output-dir / cache-dir

Flower's ``run_config`` (``[tool.flwr.app.config]`` in pyproject.toml, ``--run-config``) carries
only the selectors and an ``overrides`` string of OmegaConf dotlist items, e.g.
``--run-config "benchmark='vision' overrides='expert.epochs=3 select.m=200'"``.
Unknown keys and mistyped values raise :class:`ConfigError` naming the key, before any training.

``schema`` holds every key and default and the allowed choices, ``resolve`` the merge order,
``validate`` the checks; everything is imported from here.
"""

from metamoe.config.resolve import conf_dir, config_hash, parse_overrides, resolve_config, to_container
from metamoe.config.schema import (
                                    CHOICES,
                                    RUN_CONFIG_KEYS,
                                    BenchmarkConf,
                                    Config,
                                    ConfigError,
                                    ExpertConf,
                                    FederationConf,
                                    FLConf,
                                    ModelConf,
                                    OptimConf,
                                    PretrainConf,
                                    PrivacyConf,
                                    RunConf,
                                    ScreenConf,
                                    SelectConf,
                                    SketchConf,
                                    UnifyConf,
                                    num_clients,
)
from metamoe.config.validate import validate

__all__ = ["CHOICES", "RUN_CONFIG_KEYS", "BenchmarkConf", "Config", "ConfigError", "ExpertConf",
           "FLConf", "FederationConf", "ModelConf", "OptimConf", "PretrainConf", "PrivacyConf",
           "RunConf", "ScreenConf", "SelectConf", "SketchConf", "UnifyConf", "conf_dir",
           "config_hash", "num_clients", "parse_overrides", "resolve_config", "to_container",
           "validate"]
