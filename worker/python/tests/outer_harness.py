"""A stand-in for the worker agent's end of DROVER_OUTER_SOCKET (the real one is
TypeScript, worker/src/bridge/outer-sync-socket.ts), and the code the OuterSync tests
run in spawned ranks of a real gloo process group."""
from __future__ import annotations

import os
import socket
import threading
from typing import Callable

import numpy as np

from drover_agent.outer_socket import Deadline, frame, read_header, recv_exactly_into

OTHER_GROUP_WEIGHT = 24.0


def other_group_delta(outer_step: int, numel: int) -> np.ndarray:
    """What the imaginary second group contributes at an outer step."""
    return (np.random.default_rng(outer_step).standard_normal(numel, dtype=np.float32) * np.float32(1e-2)).astype(np.float32)


def weighted_mean_with_other_group(header: dict, payload: np.ndarray) -> tuple[dict, bytes]:
    """The answer of a two-group exchange ("a" is the trainer's group, "b" the other)."""
    w = np.float32(header["weight"])
    other = other_group_delta(header["outer_step"], payload.size)
    total = (payload * w + other * np.float32(OTHER_GROUP_WEIGHT)) / (w + np.float32(OTHER_GROUP_WEIGHT))
    answer = {"v": 1, "kind": "outer_result", "outer_step": header["outer_step"], "groups": ["a", "b"],
              "weights": {"a": header["weight"], "b": OTHER_GROUP_WEIGHT}, "bytes_sent": payload.nbytes,
              "seconds": 0.01, "codec": header["codec"], "tensors": header["tensors"]}
    return answer, total.astype("<f4").tobytes()


def read_request(conn: socket.socket, deadline_s: float = 30.0) -> tuple[dict, np.ndarray]:
    deadline = Deadline(deadline_s)
    header = read_header(conn, deadline, who="the trainer")
    numel = sum(int(np.prod(t["shape"], dtype=np.int64)) for t in header["tensors"])
    copies = {"outer_step": 1, "join": 0, "state": 2}[header["kind"]]
    payload = bytearray(numel * 4 * copies)
    recv_exactly_into(conn, memoryview(payload), deadline, "the payload")
    return header, np.frombuffer(payload, dtype="<f4").copy()


class FakeOuterAgent:
    """Serves outer-step requests on a unix socket, one connection after the other.
    `fail` maps an outer step to an error message answered (once) as outer_error."""

    def __init__(self, path: str, respond: Callable = weighted_mean_with_other_group, fail: dict[int, str] | None = None,
                 join_state: np.ndarray | None = None, join_at: tuple[int, int] = (0, 0), send_state_to: list[str] | None = None):
        self.path, self.respond, self.fail = path, respond, dict(fail or {})
        # A join is answered with this state (outer parameters then momentum) of group "b"
        # at join_at = (outer step, inner step); outer steps ask for the state to go to send_state_to.
        self.join_state, self.join_at, self.send_state_to = join_state, join_at, list(send_state_to or [])
        self.states: list[tuple[dict, np.ndarray]] = []
        self.requests: list[dict] = []
        self.connections = 0
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return  # closed
            self.connections += 1
            with conn:
                while True:
                    try:
                        header, payload = read_request(conn)
                    except Exception:
                        break  # the trainer closed the connection
                    self.requests.append(header)
                    if header["kind"] == "join":
                        mode = "own" if self.join_state is None else "state"
                        outer_step, inner_step = self.join_at if mode == "state" else (header["outer_step"], header["inner_step"])
                        answer = {"v": 1, "kind": "join_result", "mode": mode, "outer_step": outer_step, "inner_step": inner_step,
                                  "from": "b" if mode == "state" else "", "groups": ["a", "b"], "send_state_to": [],
                                  "tensors": header["tensors"]}
                        conn.sendall(frame(answer) + (b"" if self.join_state is None else self.join_state.astype("<f4").tobytes()))
                        continue
                    if header["kind"] == "state":
                        self.states.append((header, payload))
                        conn.sendall(frame({"v": 1, "kind": "state_sent", "outer_step": header["outer_step"], "groups": self.send_state_to}))
                        continue
                    error = self.fail.pop(header["outer_step"], None)
                    if error is not None:
                        conn.sendall(frame({"v": 1, "kind": "outer_error", "outer_step": header["outer_step"], "error": error}))
                        continue
                    answer, data = self.respond(header, payload)
                    answer = {**answer, "send_state_to": self.send_state_to}
                    conn.sendall(frame(answer) + data)

    def close(self) -> None:
        self.server.close()
        if os.path.exists(self.path):
            os.unlink(self.path)


def small_model():
    import torch

    torch.manual_seed(0)
    model = torch.nn.Module()
    # Shapes that shard unevenly over 2 ranks (37 rows: 19 + 18; 1 row: 1 + empty;
    # 3 elements: 2 + 1) and one big enough for whole vector lanes.
    model.a = torch.nn.Parameter(torch.randn(37, 5))
    model.b = torch.nn.Parameter(torch.randn(1, 4))
    model.c = torch.nn.Parameter(torch.randn(3))
    model.d = torch.nn.Parameter(torch.randn(64, 33))
    return model


def inner_update(model, step: int) -> None:
    """Stands in for inner training: the same full change of every parameter whatever
    the sharding (each rank adds its piece of it)."""
    import torch
    from torch.distributed.tensor import DTensor

    from drover_agent.outer_sync import _piece_of

    with torch.no_grad():
        for index, (name, p) in enumerate(model.named_parameters()):
            g = torch.Generator().manual_seed(1000 * step + index)
            full = torch.randn(p.shape, generator=g) * 1e-2
            local = p.to_local() if isinstance(p, DTensor) else p
            local.add_(_piece_of(p, full))


def group_a_rank(rank: int, world_size: int):
    """The small model (FSDP2-sharded over the group's ranks when there are several) and
    the trainer environment of rank `rank` of group a, the first of two groups."""
    from drover_agent.contract import TrainerEnv

    model = small_model()
    if world_size > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    env = TrainerEnv.from_env({"RANK": str(rank), "WORLD_SIZE": str(world_size), "DROVER_GROUP": "a",
                               "DROVER_GROUP_COUNT": "2", "DROVER_GROUP_INDEX": "0"})
    return model, env


def outer_run(rank: int, world_size: int, sock_path: str, out_dir: str) -> None:
    """Three inner steps per outer step, two good outer steps, a third the agent
    refuses, then the third again. Saves what this rank ends with."""
    import torch

    from drover_agent.outer_sync import OuterSync, OuterSyncError

    model, env = group_a_rank(rank, world_size)
    lines: list[str] = []
    # One try: the refused step surfaces as an error here (OuterSync's own retry is tested apart).
    sync = OuterSync(model, every=3, env=env, socket_path=sock_path if rank == 0 else None, log=lines.append, tries=1)
    reports, errors = [], []
    for step in range(1, 10):
        inner_update(model, step)
        try:
            report = sync.maybe_step(step, samples_since_last=8 * (step - sync.last_inner_step))
        except OuterSyncError as e:
            errors.append(str(e))
            report = sync.step(8 * (step - sync.last_inner_step))  # the agent answers the retry
            sync.last_inner_step = step
        if report is not None:
            reports.append(report)
    state = sync.state_dict()
    full = {name: sync._full(p, o) for (name, p), o in zip(sync._params, sync._outer)}
    params = {name: sync._full(p, p.to_local() if hasattr(p, "to_local") else p.detach()).clone() for name, p in model.named_parameters()}
    torch.save({"checksums": [r["checksum"] for r in reports], "outer_steps": [r["outer_step"] for r in reports],
                "groups": [r["groups"] for r in reports], "errors": errors, "lines": lines,
                "outer": full, "params": params, "outer_step": state["outer_step"]},
               os.path.join(out_dir, f"rank{rank}.pt"))


def _in_process_group(rank: int, world_size: int, port: int, run: Callable, sock_path: str, out_dir: str) -> None:
    """Runs `run` as one rank of a gloo process group (what mp.spawn starts)."""
    import torch
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="env://")
    completed = False
    try:
        run(rank, world_size, sock_path, out_dir)
        completed = True
    finally:
        if completed:
            dist.barrier()
        dist.destroy_process_group()


def spawned_outer_run(rank: int, world_size: int, port: int, sock_path: str, out_dir: str) -> None:
    _in_process_group(rank, world_size, port, outer_run, sock_path, out_dir)


def join_run(rank: int, world_size: int, sock_path: str, out_dir: str) -> None:
    """Joins (the agent hands over group b's live state), then one outer step whose
    answer asks for this group's state. Saves what this rank holds after each."""
    import torch

    from drover_agent.outer_sync import OuterSync

    model, env = group_a_rank(rank, world_size)
    lines: list[str] = []
    sync = OuterSync(model, every=4, env=env, socket_path=sock_path if rank == 0 else None, log=lines.append, inner_step=8)
    joined = sync.join()
    full = lambda tensors: {name: sync._full(p, t).clone() for (name, p), t in zip(sync._params, tensors)}  # noqa: E731
    params = lambda: {name: sync._full(p, p.to_local() if hasattr(p, "to_local") else p.detach()).clone() for name, p in model.named_parameters()}  # noqa: E731
    after_join = {"outer": full(sync._outer), "momentum": full(sync._momentum), "params": params(),
                  "outer_step": sync.outer_step, "last_inner_step": sync.last_inner_step}
    inner_update(model, 1)
    report = sync.maybe_step(joined["inner_step"] + 4, samples_since_last=32)
    after_step = {"outer": full(sync._outer), "momentum": full(sync._momentum), "outer_step": sync.outer_step}
    torch.save({"joined": joined, "after_join": after_join, "after_step": after_step, "report_send": report["send_state_to"],
                "lines": lines}, os.path.join(out_dir, f"rank{rank}.pt"))


def spawned_join_run(rank: int, world_size: int, port: int, sock_path: str, out_dir: str) -> None:
    _in_process_group(rank, world_size, port, join_run, sock_path, out_dir)
