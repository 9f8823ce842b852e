"""The ClientApp: every message type of the protocol and the handler that answers it.

The handlers are plain functions in ``clients/handlers.py`` (MetaMoE and the one-shot
baselines) and ``clients/fl_handlers.py`` (the iterative federated baselines); each message
type is defined, with what its reply uploads, in ``metamoe/protocol.py``. Nothing outside
this module registers a handler, and no server module imports it.
"""

from __future__ import annotations

import functools

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from metamoe import device, protocol
from metamoe.clients import fl_handlers, handlers
from metamoe.config import resolve_config

HANDLERS = {
    protocol.IDENTIFY: handlers.identify,
    protocol.SKETCH: handlers.sketch,
    protocol.EXPERT: handlers.expert,
    protocol.EVALUATE: handlers.evaluate,
    protocol.FL_SEED: fl_handlers.fl_seed,
    protocol.FEDAVG_TRAIN: fl_handlers.fedavg_train,
    protocol.FL_MOE_TRAIN: fl_handlers.fl_moe_train,
    protocol.DDOME_SELECT: fl_handlers.ddome_select,
    protocol.DDOME_TRAIN: fl_handlers.ddome_train,
    protocol.DDOME_EVALUATE: fl_handlers.ddome_evaluate,
}
if set(HANDLERS) != set(protocol.MESSAGE_TYPES):
    raise RuntimeError(f"message types without a handler: "
                       f"{sorted(set(protocol.MESSAGE_TYPES) - set(HANDLERS))}")



def on_device(handler):
    """Run ``handler`` under the runtime of ``run.device`` / ``run.precision``, resolved here,
    inside the handler's process (Ray sets the actor's visible GPUs at run time); the GPU
    memory the handler allocated is released before the reply leaves."""
    @functools.wraps(handler)
    def handle(msg: Message, context: Context) -> Message:
        run = resolve_config(context.run_config).run
        with device.use(device.from_run_config(run)):
            return handler(msg, context)
    return handle


def build_client_app(mods: list | None = None) -> ClientApp:
    """A ClientApp answering every message type (``mods``: Flower client mods, e.g. tests')."""
    client = ClientApp(mods=mods or [])
    for message_type, handler in HANDLERS.items():
        # "query.sketch" -> client.query("sketch")(handler); "train" -> client.train()(handler)
        kind, _, action = message_type.partition(".")
        register = getattr(client, kind)
        (register(action) if action else register())(on_device(handler))
    return client


app = build_client_app()
