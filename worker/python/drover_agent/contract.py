"""The environment a trainer process sees (ARCHITECTURE.md, "Trainer contract")."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


@dataclass(frozen=True)
class TrainerEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    group_rank: int
    master_addr: str | None
    master_port: int | None
    run_id: str | None
    job_id: str | None
    group: str | None
    ckpt_dir: str | None
    resume_dir: str | None
    agent_socket: str | None
    # The whole job across groups (each group is its own torch world; without Drover,
    # one group holding every rank).
    group_index: int = 0
    group_count: int = 1
    global_rank: int = 0
    global_world_size: int = 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "TrainerEnv":
        env = os.environ if env is None else env
        port = env.get("MASTER_PORT")
        return cls(
            rank=_int(env, "RANK", 0),
            world_size=_int(env, "WORLD_SIZE", 1),
            local_rank=_int(env, "LOCAL_RANK", 0),
            local_world_size=_int(env, "LOCAL_WORLD_SIZE", 1),
            group_rank=_int(env, "GROUP_RANK", 0),
            master_addr=env.get("MASTER_ADDR") or None,
            master_port=_int(env, "MASTER_PORT", 0) if port else None,
            run_id=env.get("DROVER_RUN_ID") or None,
            job_id=env.get("DROVER_JOB_ID") or None,
            group=env.get("DROVER_GROUP") or None,
            ckpt_dir=env.get("DROVER_CKPT_DIR") or None,
            resume_dir=env.get("DROVER_RESUME_DIR") or None,
            agent_socket=env.get("DROVER_AGENT_SOCKET") or None,
            group_index=_int(env, "DROVER_GROUP_INDEX", 0),
            group_count=_int(env, "DROVER_GROUP_COUNT", 1),
            global_rank=_int(env, "DROVER_GLOBAL_RANK", _int(env, "RANK", 0)),
            global_world_size=_int(env, "DROVER_GLOBAL_WORLD_SIZE", _int(env, "WORLD_SIZE", 1)),
        )
