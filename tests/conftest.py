"""Shared fixtures: one cache directory per test session (M0 checkpoints and the built
benchmarks are keyed by config hashes, so sharing them across end-to-end tests is safe and
saves rebuilding them in every test)."""

import os

import pytest


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    """``$METAMOE_CACHE_DIR`` (the Makefile sets ``.cache/``) or a session temp dir."""
    return os.environ.get("METAMOE_CACHE_DIR") or str(tmp_path_factory.mktemp("metamoe-cache"))
