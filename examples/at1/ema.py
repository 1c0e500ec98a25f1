"""Exponential moving average of the weights, kept on every rank for that rank's
shard only (so EMA memory is sharded exactly like the parameters)."""
from __future__ import annotations

import contextlib

import torch

from parallel import local_tensor


class ShardedEMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {name: local_tensor(p).detach().float().clone() for name, p in model.named_parameters()}

    def decay_at(self, step: int) -> float:
        # Early on the average would be dominated by the random initialisation; ramp
        # the decay up so the EMA tracks the model in short runs too.
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        weight = 1.0 - self.decay_at(step)
        for name, p in model.named_parameters():
            self.shadow[name].lerp_(local_tensor(p).detach().float(), weight)

    @contextlib.contextmanager
    def swapped_into(self, model: torch.nn.Module):
        """Run the model with EMA weights inside the block, its own weights after."""
        backup = {}
        with torch.no_grad():
            for name, p in model.named_parameters():
                local = local_tensor(p)
                backup[name] = local.detach().clone()
                local.copy_(self.shadow[name])
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    local_tensor(p).copy_(backup[name])
