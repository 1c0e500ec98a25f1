"""Helper for trainers run by Drover (no torch dependency, standard library only).

    import drover_agent
    agent = drover_agent.Agent.from_env()
    agent.metric(step, loss=0.12, lr=1e-4)
    agent.checkpoint(step, "/abs/ckpt/100", ["model.rank0.pt", ...])

With DROVER_AGENT_SOCKET set, each call sends one NDJSON line to the worker agent's
unix socket (protocol in ARCHITECTURE.md, "Agent socket protocol"). Without it (plain
torchrun) the same information is printed as a log line. If the socket cannot be
reached or goes away, the helper says so once on stderr and keeps printing: losing the
agent must never kill a training run.

Cross-group sync (DiLoCo outer steps through DROVER_OUTER_SOCKET) needs torch:
`from drover_agent.outer_sync import OuterSync` (drover_agent/outer_sync.py). The
names OuterSync and OuterSyncError are also reachable here, imported (with torch) only
when first used; the wire client (drover_agent/outer_socket.py) is standard library.
"""
from drover_agent.agent import MAX_LINE_BYTES, PROTOCOL_VERSION, Agent
from drover_agent.contract import TrainerEnv
from drover_agent.outer_socket import OuterSocketClient, OuterSocketError, OuterStepRefused

__all__ = ["Agent", "TrainerEnv", "MAX_LINE_BYTES", "PROTOCOL_VERSION", "OuterSocketClient", "OuterSocketError",
           "OuterStepRefused"]  # not OuterSync: `import *` must not pull in torch

_NEEDS_TORCH = ("OuterSync", "OuterSyncError")


def __getattr__(name: str):
    if name in _NEEDS_TORCH:
        from drover_agent import outer_sync

        return getattr(outer_sync, name)
    raise AttributeError(f"module 'drover_agent' has no attribute {name!r}")
