"""The trainer -> agent client: NDJSON over a unix stream socket."""
from __future__ import annotations

import json
import math
import numbers
import os
import socket
import sys
from typing import Iterable, Mapping, TextIO

from drover_agent.contract import TrainerEnv

PROTOCOL_VERSION = 1
MAX_LINE_BYTES = 64 * 1024  # including the trailing newline
SEND_TIMEOUT_S = 5.0  # an agent that stops reading must not stall training forever


def _number(name: str, value) -> float | int | None:
    """A JSON number, or None for NaN/inf (which JSON cannot carry)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real,)) and not hasattr(value, "__float__"):
        raise TypeError(f"metric {name!r} must be a number, got {type(value).__name__}")
    if isinstance(value, numbers.Integral):
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else None


class Agent:
    def __init__(self, socket_path: str | None, rank: int = 0, log: TextIO | None = None):
        self.socket_path = socket_path
        self.rank = rank
        self.log = log if log is not None else sys.stdout
        self._sock: socket.socket | None = None
        self._broken = False  # set once the socket failed; from then on we only print

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, log: TextIO | None = None) -> "Agent":
        contract = TrainerEnv.from_env(env)
        return cls(contract.agent_socket, rank=contract.rank, log=log)

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def metric(self, step: int, **values) -> None:
        clean, dropped = {}, []
        for name, value in values.items():
            number = _number(name, value)
            if number is None:
                dropped.append(name)
            else:
                clean[name] = number
        if dropped:
            self._print(f"drover: step {step}: non-finite metric(s) {', '.join(dropped)} not sent: " +
                        ", ".join(f"{n}={values[n]}" for n in dropped))
        self._emit({"v": PROTOCOL_VERSION, "kind": "metric", "rank": self.rank, "step": int(step), "values": clean})

    def checkpoint(self, step: int, directory: str, files: Iterable[str]) -> None:
        files = list(files)
        for f in files:
            if os.path.isabs(f) or ".." in f.split("/"):
                raise ValueError(f"checkpoint file {f!r} must be a path relative to {directory}")
        self._emit({"v": PROTOCOL_VERSION, "kind": "checkpoint", "rank": self.rank, "step": int(step),
                    "dir": os.path.abspath(directory), "files": files})

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def _emit(self, message: dict) -> None:
        line = json.dumps(message, separators=(",", ":"), allow_nan=False) + "\n"
        data = line.encode("utf-8")
        if len(data) > MAX_LINE_BYTES:
            raise ValueError(f"drover agent message of {len(data)} bytes exceeds the {MAX_LINE_BYTES}-byte line limit "
                             f"(kind={message['kind']}, step={message['step']})")
        if self.socket_path is None or self._broken:
            self._print("drover: " + line.rstrip("\n"))
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._sock.settimeout(SEND_TIMEOUT_S)
                self._sock.connect(self.socket_path)
            self._sock.sendall(data)
        except OSError as e:
            self._broken = True
            self.close()
            print(f"drover: agent socket {self.socket_path} unusable ({e}); printing metrics and checkpoints from now on",
                  file=sys.stderr, flush=True)
            self._print("drover: " + line.rstrip("\n"))

    def _print(self, text: str) -> None:
        try:
            print(text, file=self.log, flush=True)
        except (OSError, ValueError):
            pass  # a closed stdout must not kill training either
