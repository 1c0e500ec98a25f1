"""Checkpoints: every rank writes only its own files into `<ckpt_dir>/<step>/`.

Files of rank r (all tensors are this rank's FSDP shards; with one unsharded process
they are the full tensors):
    model.rank<r>.pt       {param name: tensor}
    ema.rank<r>.pt         {param name: tensor}
    optimizer.rank<r>.pt   {param name: {"step", "exp_avg", "exp_avg_sq"}}
    trainer.rank<r>.json   step, config, scheduler, data position, noise RNG state,
                           optimizer hyper-parameters, early-stopping state
    outer.rank<r>.pt       only with --outer-every: OuterSync.state_dict() (drover_agent):
                           outer parameters and momentum {param name: tensor}, the outer
                           step and the inner step of the latest outer step
Tensor files hold only plain tensors in nested dicts and are read back with
torch.load(weights_only=True), which refuses arbitrary pickled objects. Everything else
is JSON. Each file is written to a temporary name and renamed, so a crashed writer
never leaves a half-written file under its final name.

Resuming with the same world size reads only the rank's own files. With a different
world size every rank concatenates all ranks' shards (FSDP2 splits dim 0 in rank
order) and takes its new piece; the data position cannot carry over then (the shard
assignment changed), so the stream restarts at the next epoch.
"""
from __future__ import annotations

import json
import os

import torch

from parallel import DistContext, like_param, local_tensor, shard_of_full

FORMAT = "at1-checkpoint-v1"
TENSOR_KINDS = ("model", "ema", "optimizer")


def rank_files(rank: int) -> list[str]:
    return [f"{kind}.rank{rank}.pt" for kind in TENSOR_KINDS] + [f"trainer.rank{rank}.json"]


def _atomic_torch_save(obj, path: str) -> None:
    tmp = path + ".partial"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_json(obj, path: str) -> None:
    tmp = path + ".partial"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return local_tensor(t).detach().to("cpu", copy=True).contiguous()


def save_checkpoint(step_dir: str, ctx: DistContext, model, ema, optimizer, trainer_state: dict,
                    outer_state: dict | None = None) -> list[str]:
    """Write this rank's files; returns their names relative to step_dir."""
    os.makedirs(step_dir, exist_ok=True)
    r = ctx.rank
    names = {p: name for name, p in model.named_parameters()}
    _atomic_torch_save({name: _cpu(p) for name, p in model.named_parameters()}, os.path.join(step_dir, f"model.rank{r}.pt"))
    _atomic_torch_save({name: t.detach().cpu().clone() for name, t in ema.shadow.items()}, os.path.join(step_dir, f"ema.rank{r}.pt"))
    optim_state = {names[p]: {k: _cpu(v) for k, v in state.items()} for p, state in optimizer.state.items()}
    _atomic_torch_save(optim_state, os.path.join(step_dir, f"optimizer.rank{r}.pt"))
    param_groups = [
        {**{k: v for k, v in group.items() if k != "params"}, "params": [names[p] for p in group["params"]]}
        for group in optimizer.param_groups
    ]
    state = {"format": FORMAT, "rank": r, "world_size": ctx.world_size, "replicas": ctx.replicas,
             "param_groups": param_groups, **trainer_state}
    files = rank_files(r)
    if outer_state is not None:
        _atomic_torch_save(outer_state, os.path.join(step_dir, f"outer.rank{r}.pt"))
        files.append(f"outer.rank{r}.pt")
    # The trainer file last: a step dir whose trainer file exists has all the others.
    _atomic_json(state, os.path.join(step_dir, f"trainer.rank{r}.json"))
    return files


def _load_tensor_file(path: str):
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file {path} is missing")
    return torch.load(path, map_location="cpu", weights_only=True)


class CheckpointReader:
    def __init__(self, step_dir: str, ctx: DistContext):
        self.step_dir, self.ctx = step_dir, ctx
        own = os.path.join(step_dir, f"trainer.rank{ctx.rank}.json")
        first = os.path.join(step_dir, "trainer.rank0.json")
        path = own if os.path.exists(own) else first
        if not os.path.exists(path):
            raise FileNotFoundError(f"{step_dir} is not an AT-1 checkpoint: it has no trainer.rank0.json")
        with open(path) as f:
            self.trainer_state = json.load(f)
        if self.trainer_state.get("format") != FORMAT:
            raise ValueError(f"{path}: unknown checkpoint format {self.trainer_state.get('format')!r}, expected {FORMAT}")
        self.saved_world_size = self.trainer_state["world_size"]
        # HSDP (--hsdp) checkpoints: every replica holds the same shards; ranks
        # 0 .. world_size/replicas - 1 (the first replica) hold each piece once.
        self.saved_replicas = self.trainer_state.get("replicas", 1)
        self.saved_shard_ranks = range(self.saved_world_size // self.saved_replicas)
        self.same_layout = (self.saved_world_size == ctx.world_size and self.saved_replicas == ctx.replicas
                            and path == own)

    def _local_tensors(self, kind: str, params: dict[str, torch.Tensor]) -> dict:
        """{param name: this rank's tensor (or dict of tensors for the optimizer)}."""
        if self.same_layout:
            return _load_tensor_file(os.path.join(self.step_dir, f"{kind}.rank{self.ctx.rank}.pt"))
        parts = [_load_tensor_file(os.path.join(self.step_dir, f"{kind}.rank{r}.pt")) for r in self.saved_shard_ranks]

        def reshard(pieces: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
            if pieces[0].dim() == 0:  # e.g. the optimizer's step count, same on every rank
                return pieces[0]
            return shard_of_full(torch.cat(pieces, dim=0), like, self.ctx.rank, self.ctx.world_size)

        result = {}
        for name in parts[0]:
            if isinstance(parts[0][name], dict):
                result[name] = {k: reshard([p[name][k] for p in parts], params[name]) for k in parts[0][name]}
            else:
                result[name] = reshard([p[name] for p in parts], params[name])
        return result

    def restore(self, model, ema, optimizer) -> dict:
        params = dict(model.named_parameters())
        model_tensors = self._local_tensors("model", params)
        ema_tensors = self._local_tensors("ema", params)
        optim_tensors = self._local_tensors("optimizer", params)
        missing = sorted(set(params) - set(model_tensors))
        unexpected = sorted(set(model_tensors) - set(params))
        if missing or unexpected:
            raise ValueError(f"{self.step_dir}: checkpoint does not fit this model (missing {missing[:5]}, unexpected {unexpected[:5]})")
        with torch.no_grad():
            for name, p in params.items():
                local = local_tensor(p)
                for label, t in (("model", model_tensors[name]), ("ema", ema_tensors[name])):
                    if t.shape != local.shape:
                        raise ValueError(f"{self.step_dir}: {label} tensor {name} has shape {tuple(t.shape)}, this rank's shard is {tuple(local.shape)}")
                local.copy_(model_tensors[name])
                ema.shadow[name].copy_(ema_tensors[name])
        device = next(iter(params.values())).device
        for name, state in optim_tensors.items():
            p = params[name]
            optimizer.state[p] = {
                k: (v if v.dim() == 0 and k == "step" else like_param(p, v.to(device)))
                for k, v in state.items()
            }
        saved_groups = self.trainer_state["param_groups"]
        if len(saved_groups) != len(optimizer.param_groups):
            raise ValueError(f"{self.step_dir}: checkpoint has {len(saved_groups)} optimizer groups, this run {len(optimizer.param_groups)}")
        for group, saved in zip(optimizer.param_groups, saved_groups):
            for k, v in saved.items():
                if k != "params":
                    group[k] = tuple(v) if isinstance(group.get(k), tuple) else v
        return self.trainer_state

    def outer_state(self, model) -> dict | None:
        """This rank's OuterSync state, or None when the checkpoint was taken without
        --outer-every. With another world size the shards are concatenated and re-split
        like the model's."""
        if self.same_layout:
            path = os.path.join(self.step_dir, f"outer.rank{self.ctx.rank}.pt")
            return _load_tensor_file(path) if os.path.exists(path) else None
        if not os.path.exists(os.path.join(self.step_dir, "outer.rank0.pt")):
            return None
        parts = [_load_tensor_file(os.path.join(self.step_dir, f"outer.rank{r}.pt")) for r in self.saved_shard_ranks]
        params = dict(model.named_parameters())
        state = {k: v for k, v in parts[0].items() if k not in ("params", "momentum")}

        def reshard(pieces: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
            if pieces[0].dim() == 0:  # not sharded: the same on every rank
                return pieces[0]
            return shard_of_full(torch.cat(pieces, dim=0), like, self.ctx.rank, self.ctx.world_size)

        for kind in ("params", "momentum"):
            state[kind] = {name: reshard([p[kind][name] for p in parts], params[name]) for name in parts[0][kind]}
        return state
