"""A steady toy trainer for watchdog tests: every rank all-reduces a number and reports a
step every 0.2 s, `--steps` times (plain torch.distributed, gloo; runs under torchrun or
Drover)."""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "worker", "python"))
import drover_agent  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--step-seconds", type=float, default=0.2)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    agent = drover_agent.Agent.from_env()
    rank = dist.get_rank()
    for step in range(1, args.steps + 1):
        value = torch.tensor([float(rank + step)])
        dist.all_reduce(value)
        agent.metric(step, total=float(value))
        time.sleep(args.step_seconds)
    print(f"DONE rank={rank} steps={args.steps}", flush=True)
    agent.close()
    dist.barrier()
    # No process-group destructors at exit: torch 2.11's gloo teardown can abort a rank
    # (see allreduce_train.py).
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
