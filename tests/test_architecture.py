"""The package's import direction and the server/client split (static and at import time).

Layers, lowest first: config, device and protocol ← models, proxy ← data, training ← {clients,
strategies} ← {clients.client_app, server} ← {launch, compare}. A module imports only from
its own layer or below, and clients/ and strategies/ never import each other: they share
only protocol.py, models and training (and the data/proxy/config layers under them).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "metamoe"

LAYERS = [  # (module prefix, layer); the longest matching prefix wins
    ("metamoe.config", 0), ("metamoe.logging_utils", 0), ("metamoe.protocol", 0),
    ("metamoe.device", 0), ("metamoe.progress", 0), ("metamoe.budget", 0),
    ("metamoe.models", 1), ("metamoe.proxy", 1),
    ("metamoe.data", 2), ("metamoe.training", 2), ("metamoe.dpsgd", 1),
    ("metamoe.clients", 3), ("metamoe.strategies", 3),
    ("metamoe.clients.client_app", 4), ("metamoe.server", 4),
    ("metamoe.resources", 5), ("metamoe.launch", 5), ("metamoe.compare", 5),
    ("metamoe.compare_tables", 5), ("metamoe.compare_publish", 5), ("metamoe.compare_plan", 5),
]


def layer_of(module: str) -> int:
    best = max((p for p, _ in LAYERS if module == p or module.startswith(p + ".")),
               key=len, default=None)
    if best is None:
        raise AssertionError(f"{module} has no layer in tests/test_architecture.py: add it")
    return dict(LAYERS)[best]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every metamoe module ``path`` imports, function-local imports included."""
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("metamoe")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("metamoe"):
            base = node.module
            for a in node.names:  # "from metamoe.clients import stages" imports a module
                sub = f"{base}.{a.name}"
                out.add(sub if (PKG.parent / (sub.replace(".", "/") + ".py")).exists()
                        or (PKG.parent / sub.replace(".", "/")).is_dir() else base)
    return out


MODULES = sorted(p for p in PKG.rglob("*.py") if p.name != "__init__.py" or p.parent != PKG)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_point_down(path):
    me = module_name(path)
    mine = layer_of(me)
    for dep in sorted(imports_of(path)):
        if dep == "metamoe":
            continue
        assert layer_of(dep) <= mine, f"{me} (layer {mine}) imports {dep} (layer {layer_of(dep)})"
        for a, b in (("metamoe.clients", "metamoe.strategies"),
                     ("metamoe.strategies", "metamoe.clients")):
            if me.startswith(a):
                assert not dep.startswith(b), f"{me} imports {dep}: clients/ and strategies/ " \
                                              "share only protocol, models and training"


def test_layer_table_sees_the_known_violation():
    """The checker itself: a server strategy importing a client module would be caught."""
    assert layer_of("metamoe.clients.client_app") > layer_of("metamoe.strategies.fedavg")
    assert layer_of("metamoe.training") > layer_of("metamoe.models.moe")
    assert "metamoe.clients.stages" in imports_of(PKG / "clients" / "handlers.py")


def test_strategies_do_not_load_the_client_app():
    """Importing every server strategy constructs no ClientApp and loads no client module."""
    mods = sorted(module_name(p) for p in (PKG / "strategies").glob("*.py"))
    code = ("import sys\n" + "".join(f"import {m}\n" for m in mods) +
            "import metamoe.server.server_app\n"
            "bad = sorted(m for m in sys.modules if m.startswith('metamoe.clients'))\n"
            "print(bad)\nsys.exit(1 if bad else 0)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, f"client modules loaded on the server: {res.stdout}{res.stderr}"


def test_client_app_registers_every_message_type():
    from metamoe import protocol
    from metamoe.clients.client_app import HANDLERS, app

    assert set(HANDLERS) == set(protocol.MESSAGE_TYPES)
    assert app is not None
