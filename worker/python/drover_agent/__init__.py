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
"""
from drover_agent.agent import MAX_LINE_BYTES, PROTOCOL_VERSION, Agent
from drover_agent.contract import TrainerEnv

__all__ = ["Agent", "TrainerEnv", "MAX_LINE_BYTES", "PROTOCOL_VERSION"]
