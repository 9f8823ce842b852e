"""The project's real ServerApp and ClientApp in Flower's simulation engine, for tests.

``flwr.simulation.run_simulation`` hands both apps an empty (read-only) ``run_config``: the
server side gets the test's run config through a wrapper ``main``, each node through a
:func:`with_run_config` view of its Context (same node, same state) passed on by a Flower mod.
A test's own mod (fault injection, attacks, recording) does the same and wraps ``call_next``.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context, Message
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation

Mod = Callable[[Message, Context, Callable], Message]


def with_run_config(ctx: Context, run_config: dict, **node_config) -> Context:
    """``ctx`` with the test's run config (and ``node_config`` entries replaced, e.g. another
    partition-id), sharing the node's state."""
    return Context(run_id=ctx.run_id, node_id=ctx.node_id,
                   node_config={**ctx.node_config, **node_config}, state=ctx.state,
                   run_config=dict(run_config))


def server_app(run_config: dict, grid: Callable | None = None) -> ServerApp:
    """The project's ServerApp with the test's run config (and its Grid wrapped by ``grid``,
    e.g. a recorder)."""
    from metamoe.server import server_app as sa

    server = ServerApp()

    @server.main()
    def main(g, context):
        context.run_config = dict(run_config)
        sa.main(grid(g) if grid else g, context)

    return server


def simulate(run_config: dict, nodes: int, mod: Mod | None = None,
             grid: Callable | None = None) -> None:
    """One run: the project's ServerApp (its Grid wrapped by ``grid``) and ClientApp (behind
    ``mod``, or a mod that only injects ``run_config``) on ``nodes`` simulated SuperNodes, one
    CPU each."""
    from metamoe.clients import client_app as ca

    if mod is None:
        def mod(msg, ctx, call_next):
            return call_next(msg, with_run_config(ctx, run_config))

    run_simulation(server_app=server_app(run_config, grid),
                   client_app=ca.build_client_app(mods=[mod]), num_supernodes=nodes,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
