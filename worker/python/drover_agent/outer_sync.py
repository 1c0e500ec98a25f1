"""DiLoCo-style sync of one model across provider groups (needs torch; import it as
`from drover_agent.outer_sync import OuterSync`, `import drover_agent` stays torch-free).

Each provider group is its own torch world and trains with its own inner optimizer.
Every `every` inner steps the groups exchange pseudo-gradients through their leaders'
worker agents and take one outer optimizer step on identical outer parameters
(DiLoCo, Douillard et al. 2023, arXiv:2311.08105):

    sync = OuterSync(model, every=H)       # after the model is built (and restored)
    for step in range(1, steps + 1):
        train_step(...)                     # inner optimizer step
        report = sync.maybe_step(step, samples_since_last_outer_step)
    torch.save(sync.state_dict(), ...)      # part of the checkpoint, per rank

One outer step, on every rank of the group (all must call it: it uses the group's
collectives):
  1. pseudo-gradient of this rank's shard: delta = outer - local parameter (fp32);
  2. with several groups, the group's rank 0 gathers the full deltas, sends them in one
     request to the agent over DROVER_OUTER_SOCKET (drover_agent/outer_socket.py holds
     the wire protocol) and reads back the weighted mean over the groups, weight =
     samples since the last outer step; every rank gets its shard of the mean. With one
     group the mean is the group's own delta (single-worker DiLoCo, no network);
  3. Nesterov SGD on the outer parameters: m = momentum * m + g;
     outer -= lr * (g + momentum * m) (without Nesterov: outer -= lr * m);
  4. the outer parameters are copied into the model; the inner optimizer's state stays
     as it is (DiLoCo keeps AdamW's moments local to each group).

Only parameters with requires_grad take part (buffers are not synced). Parameters may
be plain tensors (one rank, or replicated on every rank) or FSDP2 DTensors sharded on
dim 0 of a 1-D mesh (torch.chunk pieces, empty past the last chunk).

Groups shard the model differently (2 ranks here, 1 there), yet their outer
parameters must stay identical to the bit: every operation on the outer state is
elementwise and rounded on its own, so an element's result does not depend on where
the element sits in a shard. `checksum()` (sha256 over every full outer parameter in
named_parameters order: the UTF-8 name, a NUL byte, the values as little-endian
float32) lets groups compare; rank 0 prints it with each step:

    outer step 3: groups a+b, 12.0 MiB sent, 1.52 s, codec fp32, checksum 0123456789abcdef

Groups leave and come back. A group whose leader is gone, silent past the timeout or
out of step is left out by the others, who complete the step among themselves. A
(re)started group calls `join()` after restoring its checkpoint: where a live group is
further along, it takes that group's outer parameters and momentum over the bridge
(after the live group's next outer step; the live group's ranks send them as part of
`maybe_step`) and returns the inner step to continue from:

    sync = OuterSync(model, every=H, inner_step=restored_step)
    sync.load_state_dict(...)               # when the checkpoint has outer state
    joined = sync.join()                    # None with one group
    step = joined["inner_step"] if joined else restored_step

`maybe_step`'s report carries "joined" (join()'s answer) when this group had to take
another group's state after the step; the trainer continues from its "inner_step".

If the exchange fails (agent unreachable, a peer group gone, a protocol error), rank 0
tells every rank and every rank raises OuterSyncError with the same message; no rank
is left waiting in a collective, and the model and outer state are unchanged. Rank 0
may wait up to timeout_s + 60 s for the agent while the other ranks wait in a
broadcast: the group's process-group timeout (torch's default is 10 min for NCCL)
must be longer than that.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from typing import Callable

import torch
import torch.distributed as dist

from drover_agent.contract import TrainerEnv
from drover_agent.outer_socket import CODECS, OUTER_SOCKET_ENV, OuterSocketClient, OuterSocketError, TensorSpec, socket_path_from_env

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # a torch built without distributed support: plain tensors only
    DTensor = Replicate = Shard = None

STATE_FORMAT = "drover-outer-sync-v1"


class OuterSyncError(RuntimeError):
    """An outer step failed; raised on every rank of the group with the same message."""


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def _print_line(line: str) -> None:
    print(line, flush=True)


class OuterSync:
    """The outer optimizer of one rank: fp32 outer parameters and momentum for this
    rank's shard of every trainable parameter, and the outer step count.

    Construct it on every rank of the group, after the model is built, sharded and
    restored from a checkpoint (the outer parameters start as the model's), then call
    `maybe_step` after every inner optimizer step and save `state_dict()` with each
    checkpoint."""

    def __init__(self, model: torch.nn.Module, *, every: int, lr: float = 0.7, momentum: float = 0.9, nesterov: bool = True,
                 codec: str = "fp32", timeout_s: float = 600.0, env: TrainerEnv | None = None,
                 log: Callable[[str], object] | None = None, socket_path: str | None = None, inner_step: int = 0,
                 tries: int = 3):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive number of inner steps, got {every!r}")
        if not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"outer lr must be a positive number, got {lr!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"outer momentum must be in [0, 1), got {momentum!r}")
        if codec not in CODECS:
            raise ValueError(f"codec {codec!r} is not one of {', '.join(CODECS)}")
        if not math.isfinite(timeout_s) or timeout_s <= 0:
            raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        if sys.byteorder != "little":
            raise OuterSyncError("the outer socket carries little-endian float32; this machine is big-endian")
        self.every, self.lr, self.momentum, self.nesterov, self.codec = every, float(lr), float(momentum), bool(nesterov), codec
        self.timeout_s = float(timeout_s)
        if isinstance(tries, bool) or not isinstance(tries, int) or tries < 1:
            raise ValueError(f"tries must be a positive number, got {tries!r}")
        # A failed exchange (a damaged frame, a peer's link broken mid-step) is tried again
        # from the start: the agents drop the step's links, every group re-announces it.
        self.tries = tries
        self.env = env if env is not None else TrainerEnv.from_env()
        self.log = log if log is not None else _print_line
        self.group = self.env.group or "local"
        self.group_count = self.env.group_count
        self.socket_path = socket_path if socket_path is not None else socket_path_from_env()
        self._dist = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self._dist else 0
        self.world_size = dist.get_world_size() if self._dist else 1

        self._params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not self._params:
            raise ValueError("the model has no trainable parameters to sync")
        for name, p in self._params:
            _check_sharding(name, p)
        self.device = _local(self._params[0][1]).device
        with torch.no_grad():
            self._outer = [_local(p).detach().to(torch.float32, copy=True) for _, p in self._params]
            self._momentum = [torch.zeros_like(o) for o in self._outer]
        self.outer_step = 0
        self.last_inner_step = inner_step  # the inner step of the latest outer step (or of the start)
        self._client: OuterSocketClient | None = None
        self._recv: torch.Tensor | None = None  # rank 0's buffer for the mean, kept between steps

        problem = None
        if self.rank == 0 and self.group_count > 1 and not self.socket_path:
            problem = (f"this job has {self.group_count} groups but {OUTER_SOCKET_ENV} is not set on group {self.group}'s rank 0: "
                       "the groups cannot sync (the worker agent of the group's leader node sets it)")
        problem = self._share({"error": problem})["error"]
        if problem:
            raise OuterSyncError(problem)

    # -- the outer step ------------------------------------------------------------

    def maybe_step(self, inner_step: int, samples_since_last: int) -> dict | None:
        """Call after every inner optimizer step, on every rank. When inner_step is a
        multiple of `every`, performs an outer step and returns its report; else None."""
        if inner_step <= 0 or inner_step % self.every:
            return None
        report = self.step(samples_since_last)
        self.last_inner_step = inner_step
        if report["send_state_to"]:
            self._send_state()
        if report["rejoin"]:
            report["joined"] = self.join()
        return report

    def step(self, weight: float) -> dict:
        """One outer step now; `weight` is the samples this group processed since the
        last one. Returns {outer_step, groups, weights, bytes_sent, seconds,
        exchange_seconds, codec, checksum}."""
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"the outer step's weight (samples since the last one) must be positive, got {weight!r}")
        started = time.perf_counter()
        k = self.outer_step + 1
        with torch.no_grad():
            deltas = [torch.sub(outer, _local(p).to(torch.float32)) for outer, (_, p) in zip(self._outer, self._params)]
            if self.group_count == 1:
                means = deltas  # one worker: the mean is the group's own pseudo-gradient
                info = {"groups": [self.group], "weights": {self.group: weight}, "bytes_sent": 0, "seconds": 0.0,
                        "send_state_to": [], "rejoin": False}
            else:
                means, info = self._exchange(k, weight, deltas)
            del deltas
            self._apply(means)
            del means
            for outer, (_, p) in zip(self._outer, self._params):
                _local(p).copy_(outer)
        self.outer_step = k
        checksum = self.checksum()
        report = {"outer_step": k, "groups": info["groups"], "weights": info["weights"], "bytes_sent": info["bytes_sent"],
                  "seconds": time.perf_counter() - started, "exchange_seconds": info["seconds"], "codec": self.codec,
                  "checksum": checksum, "send_state_to": info["send_state_to"], "rejoin": info["rejoin"]}
        if self.rank == 0:
            self.log(f"outer step {k}: groups {'+'.join(report['groups'])}, {report['bytes_sent'] / 2 ** 20:.1f} MiB sent, "
                     f"{report['seconds']:.2f} s, codec {self.codec}, checksum {checksum[:16]}")
        return report

    def _apply(self, means: list[torch.Tensor]) -> None:
        """Nesterov SGD on this rank's shards. Only separately rounded elementwise ops:
        ATen computes `add_(x, alpha=a)` as a fused multiply-add in some kernels and as
        a multiply then an add in others (vectorized lanes vs scalar tails; measured
        here: fused with the AVX2 CPU kernel, two roundings with
        ATEN_CPU_CAPABILITY=default), so with alpha an element's bits would depend on
        the machine and on where it falls in its shard, and groups would drift apart.
        mul_ by a scalar and add_/sub_ without alpha round once, the same way on every
        kernel (x * 1 is exact, so a fused form agrees)."""
        for outer, m, g in zip(self._outer, self._momentum, means):
            m.mul_(self.momentum)
            m.add_(g)  # m = momentum * m + g
            if self.nesterov:
                update = torch.mul(m, self.momentum)
                update.add_(g)  # g + momentum * m
            else:
                update = m.clone()
            update.mul_(self.lr)
            outer.sub_(update)

    def _exchange(self, k: int, weight: float, deltas: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
        # The ranks of a group hold shards of the same parameters (FSDP), not different
        # replicas, so the group's pseudo-gradient is just the gathered shards: nothing
        # to average inside the group.
        full_deltas = []
        for (_, p), delta in zip(self._params, deltas):
            full = self._full(p, delta)
            if self.rank == 0:
                full_deltas.append(full.to("cpu", torch.float32).contiguous().reshape(-1))
            del full
        answer: dict = {"error": None}
        if self.rank == 0:
            try:
                answer = self._ask_agent(k, weight, full_deltas)
            except Exception as e:  # every rank must hear of it, or the others hang in the broadcast below
                answer = {"error": f"group {self.group}: outer step {k}: {e}"}
        del full_deltas
        answer = self._share(answer)
        if answer["error"]:
            raise OuterSyncError(answer["error"])
        return self._pieces_from_rank0(self._recv), answer

    def _pieces_from_rank0(self, flat: torch.Tensor | None) -> list[torch.Tensor]:
        """This rank's piece of every parameter-shaped tensor in rank 0's flat fp32 buffer
        (the parameters in order; `flat` is read on rank 0 only): one broadcast each."""
        pieces, offset = [], 0
        for _, p in self._params:
            shape, numel = tuple(p.shape), p.numel()
            if self.rank == 0:
                full = flat[offset:offset + numel].view(shape).to(self.device)
            else:
                full = torch.empty(shape, dtype=torch.float32, device=self.device)
            if self._dist:
                dist.broadcast(full, src=0)
            pieces.append(_piece_of(p, full))
            offset += numel
        return pieces

    @property
    def _specs(self) -> list[TensorSpec]:
        return [TensorSpec(name, tuple(int(d) for d in p.shape)) for name, p in self._params]

    def _ask_agent(self, k: int, weight: float, full_deltas: list[torch.Tensor]) -> dict:
        specs = self._specs
        total = sum(p.numel() for _, p in self._params)
        if self._recv is None or self._recv.numel() != total:
            self._recv = torch.empty(total, dtype=torch.float32)
        if self._client is None:
            self._client = OuterSocketClient(self.socket_path)
        for attempt in range(1, self.tries + 1):
            try:
                result = self._client.exchange(outer_step=k, weight=weight, codec=self.codec, timeout_ms=int(self.timeout_s * 1000),
                                               tensors=specs, payload=(t.numpy() for t in full_deltas), result=self._recv.numpy())
                break
            except OuterSocketError as e:  # OuterStepRefused (the agent's outer_error) is one
                if attempt == self.tries:
                    raise
                self.log(f"outer step {k}: the exchange failed ({e}); trying again (try {attempt + 1} of {self.tries})")
        return {"error": None, "groups": result.groups, "weights": result.weights, "bytes_sent": result.bytes_sent,
                "seconds": result.seconds, "send_state_to": list(result.send_state_to), "rejoin": result.rejoin}

    # -- groups that leave and come back ---------------------------------------------

    def join(self, timeout_s: float | None = None) -> dict | None:
        """Call on every rank after restoring (or instead of restoring) the checkpoint,
        before training: asks the agent whether a live group is further along. Returns
        None with one group, else {mode: "own"|"state", outer_step, inner_step, source,
        groups}; for "state" the outer parameters, momentum and the model now hold the
        live group's outer state and the trainer continues from inner_step. Waits up to
        timeout_s (default: this sync's timeout plus 10 minutes, as a live group sends
        its state only after its next outer step)."""
        if self.group_count == 1:
            return None
        timeout = float(timeout_s) if timeout_s is not None else self.timeout_s + 600.0
        specs = self._specs
        total = sum(p.numel() for _, p in self._params)
        answer: dict = {"error": None}
        state = None
        if self.rank == 0:
            state = torch.empty(2 * total, dtype=torch.float32)
            try:
                if self._client is None:
                    self._client = OuterSocketClient(self.socket_path)
                for attempt in range(1, self.tries + 1):
                    try:
                        joined = self._client.join(outer_step=self.outer_step, inner_step=self.last_inner_step,
                                                   timeout_ms=int(timeout * 1000), tensors=specs, result=state.numpy())
                        break
                    except OuterSocketError as e:
                        if attempt == self.tries:
                            raise
                        self.log(f"joining at outer step {self.outer_step}: {e}; trying again (try {attempt + 1} of {self.tries})")
                answer = {"error": None, "mode": joined.mode, "outer_step": joined.outer_step, "inner_step": joined.inner_step,
                          "source": joined.source, "groups": joined.groups, "send_state_to": joined.send_state_to}
            except Exception as e:  # every rank must hear of it
                answer = {"error": f"group {self.group}: joining at outer step {self.outer_step}: {e}"}
        answer = self._share(answer)
        if answer["error"]:
            raise OuterSyncError(answer["error"])
        if answer["mode"] == "state":
            with torch.no_grad():
                for targets, flat in ((self._outer, state[:total] if state is not None else None),
                                      (self._momentum, state[total:] if state is not None else None)):
                    for target, piece in zip(targets, self._pieces_from_rank0(flat)):
                        target.copy_(piece)
                for outer, (_, p) in zip(self._outer, self._params):
                    _local(p).copy_(outer)
            self.outer_step = int(answer["outer_step"])
            self.last_inner_step = int(answer["inner_step"])
            if self.rank == 0:
                self.log(f"joined: took group {answer['source']}'s live outer state at outer step {self.outer_step} "
                         f"(inner step {self.last_inner_step}); in step with {'+'.join(answer['groups'])}; checksum {self.checksum()[:16]}")
            else:
                self.checksum()  # a collective: every rank takes part
        elif self.rank == 0:
            self.log(f"joined at outer step {self.outer_step} on this group's own state; in step with {'+'.join(answer['groups'])}")
        del state
        if answer["send_state_to"]:
            self._send_state()
        return {"mode": answer["mode"], "outer_step": self.outer_step, "inner_step": self.last_inner_step,
                "source": answer["source"], "groups": answer["groups"]}

    def _send_state(self) -> None:
        """Sends the outer parameters and momentum (gathered on rank 0: a collective) to
        the groups waiting for them. A failure is told, not raised: the group asks again."""
        fulls = []
        with torch.no_grad():
            for kind in (self._outer, self._momentum):
                for (_, p), local in zip(self._params, kind):
                    full = self._full(p, local)
                    if self.rank == 0:
                        fulls.append(full.to("cpu", torch.float32).contiguous().reshape(-1))
                    del full
        if self.rank != 0:
            return
        specs = self._specs
        try:
            if self._client is None:
                self._client = OuterSocketClient(self.socket_path)
            groups = self._client.share_state(outer_step=self.outer_step, inner_step=self.last_inner_step, tensors=specs,
                                              payload=[t.numpy() for t in fulls], timeout_ms=int(self.timeout_s * 1000))
            self.log(f"outer step {self.outer_step}: sent the outer state to group {'+'.join(groups) or '(none: they left)'}")
        except OuterSocketError as e:
            self.log(f"outer step {self.outer_step}: could not send the outer state ({e}); the waiting group asks again")

    # -- collectives -----------------------------------------------------------------

    def _full(self, param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """The full tensor of `local`, a shard laid out like `param` (collective for
        DTensors: all-gather; plain tensors are whole already)."""
        if DTensor is not None and isinstance(param, DTensor):
            return DTensor.from_local(local, device_mesh=param.device_mesh, placements=param.placements,
                                      shape=param.shape, stride=param.stride(), run_check=False).full_tensor()
        return local

    def _share(self, message: dict) -> dict:
        """Rank 0's message (a JSON object) on every rank."""
        if not self._dist:
            return message
        if self.rank == 0:
            data = json.dumps(message).encode("utf-8")
            size = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        else:
            size = torch.zeros(1, dtype=torch.int64, device=self.device)
        dist.broadcast(size, src=0)
        if self.rank == 0:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)
        else:
            buf = torch.empty(int(size.item()), dtype=torch.uint8, device=self.device)
        dist.broadcast(buf, src=0)
        return json.loads(bytes(buf.cpu().numpy()).decode("utf-8"))

    def checksum(self) -> str:
        """sha256 hex of the full outer parameters (identical in every group). A
        collective: every rank must call it; all get rank 0's value."""
        digest = hashlib.sha256() if self.rank == 0 else None
        with torch.no_grad():
            for (name, p), outer in zip(self._params, self._outer):
                full = self._full(p, outer)
                if digest is not None:
                    digest.update(name.encode("utf-8") + b"\0")
                    digest.update(memoryview(full.to("cpu", torch.float32).contiguous().reshape(-1).numpy()).cast("B"))
                del full
        return self._share({"checksum": digest.hexdigest() if digest is not None else None})["checksum"]

    # -- checkpoints -----------------------------------------------------------------

    def state_dict(self) -> dict:
        """This rank's outer state: plain CPU tensors, ints and strings (loadable with
        torch.load(weights_only=True)). Tensors are this rank's shards."""
        return {
            "format": STATE_FORMAT,
            "outer_step": self.outer_step,
            "last_inner_step": self.last_inner_step,
            "params": {name: o.detach().to("cpu", copy=True) for (name, _), o in zip(self._params, self._outer)},
            "momentum": {name: m.detach().to("cpu", copy=True) for (name, _), m in zip(self._params, self._momentum)},
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"outer state has format {state.get('format')!r}, expected {STATE_FORMAT}")
        names = [name for name, _ in self._params]
        for kind in ("params", "momentum"):
            saved = state[kind]
            missing, unexpected = sorted(set(names) - set(saved)), sorted(set(saved) - set(names))
            if missing or unexpected:
                raise ValueError(f"outer state {kind} does not fit this model (missing {missing[:5]}, unexpected {unexpected[:5]})")
            for name, local in zip(names, self._outer if kind == "params" else self._momentum):
                if tuple(saved[name].shape) != tuple(local.shape):
                    raise ValueError(f"outer state {kind} {name} has shape {tuple(saved[name].shape)}, "
                                     f"this rank's shard is {tuple(local.shape)}")
        with torch.no_grad():
            for name, outer, m in zip(names, self._outer, self._momentum):
                outer.copy_(state["params"][name])
                m.copy_(state["momentum"][name])
        self.outer_step = int(state["outer_step"])
        self.last_inner_step = int(state["last_inner_step"])


def _check_sharding(name: str, p: torch.Tensor) -> None:
    if DTensor is None or not isinstance(p, DTensor):
        return
    if p.device_mesh.ndim != 1 or not all(isinstance(pl, (Shard, Replicate)) for pl in p.placements) or \
            any(isinstance(pl, Shard) and pl.dim != 0 for pl in p.placements):
        # Refused, not half-done: an HSDP (2-D) mesh would need the pseudo-gradient reduced
        # over the replicate dimension first; FSDP2 on one mesh dimension is what AT-1 runs.
        raise OuterSyncError(f"OuterSync syncs parameters sharded on dim 0 of a 1-D mesh (FSDP2) or replicated; "
                             f"{name} has placements {p.placements} on a {p.device_mesh.ndim}-D mesh (--hsdp is not supported with --outer-every)")


def _piece_of(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a full tensor, laid out like `param`: FSDP2 splits dim 0
    with torch.chunk, ranks past the last chunk hold an empty piece."""
    if DTensor is None or not isinstance(param, DTensor) or isinstance(param.placements[0], Replicate):
        piece = full
    else:
        chunks = full.chunk(param.device_mesh.size(), dim=0)
        index = param.device_mesh.get_local_rank()
        piece = chunks[index] if index < len(chunks) else full.new_empty((0, *full.shape[1:]))
    local_shape = tuple(_local(param).shape)
    if tuple(piece.shape) != local_shape:
        raise OuterSyncError(f"this rank's piece of the mean has shape {tuple(piece.shape)}, its shard {local_shape}: "
                             "the parameter is not sharded the way FSDP2 shards dim 0")
    return piece
