"""The trainer's end of DROVER_OUTER_SOCKET: one outer step's tensors to the leader's
worker agent and the groups' weighted mean back (standard library only, no torch).

When a job spans several provider groups, the agent sets DROVER_OUTER_SOCKET for every
rank of its group's leader node; only the group's rank 0 (RANK == 0) connects. The agent
side is worker/src/bridge/outer-sync-socket.ts. Every message, both directions, is

    u32 little-endian header length | header (UTF-8 JSON object, at most 1 MiB) | payload

Request (trainer -> agent):

    {"v":1,"kind":"outer_step","outer_step":K,"weight":W,"codec":"fp32"|"bf16"|"fp16"|"int8",
     "timeout_ms":T,"tensors":[{"name":str,"shape":[ints]},...]}

followed by every tensor's values as little-endian float32, C order, concatenated in the
listed order (exactly sum(numel) * 4 bytes). K counts from 1; W is the samples this group
processed since its last outer step (positive); names are unique, at most 65,536
tensors, at most 16 GiB of payload. The codec is what the agents use between each other:
the trainer always sends and receives float32.

Response (agent -> trainer), either

    {"v":1,"kind":"outer_result","outer_step":K,"groups":[names, summation order],
     "weights":{name:W},"bytes_sent":N,"seconds":S,"codec":C,"tensors":[same list]}

followed by a payload of the same size holding the weighted mean of every group's
contribution (as the codec delivered it), or

    {"v":1,"kind":"outer_error","outer_step":K,"error":"message naming peer/tensor"}

with no payload. One request at a time per connection; after a result the connection
stays open for the next outer step. After an error of any kind this client closes it
(the agent closes it too after a malformed request) and the next step connects anew.

A response that is neither of those, answers another outer step, lists other tensors or
codec, or whose payload is cut short or followed by stray bytes raises OuterSocketError
naming what was wrong; an outer_error raises OuterStepRefused with the agent's message.
Every socket operation of one exchange shares one deadline of T + 60 s.

An outer_result may carry "send_state_to": [groups] (groups rejoining the job wait for
this group's outer state: send it now with `share_state`) and "rejoin": true (this group
fell out of step with a group of a lower index: `join` now). Two more requests serve
groups that leave and come back (worker/src/bridge/job-bridge.ts decides):

    {"v":1,"kind":"join","outer_step":K,"inner_step":N,"timeout_ms":T,"tensors":[...]}

with no payload, answered by

    {"v":1,"kind":"join_result","mode":"own"|"state","outer_step":K2,"inner_step":N2,
     "from":group,"groups":[...],"send_state_to":[...],"tensors":[same list]}

and, for mode "state", every outer parameter then every momentum tensor (fp32, 2x the
tensor list's size): the live state of group `from` at its outer step K2, inner step N2.
Mode "own": start on this group's own state. And

    {"v":1,"kind":"state","outer_step":K,"inner_step":N,"tensors":[...]}
    + every outer parameter then every momentum tensor (fp32)

answered by {"v":1,"kind":"state_sent","outer_step":K,"groups":[the groups it went to]}.
"""
from __future__ import annotations

import json
import math
import os
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

PROTOCOL_VERSION = 1
CODECS = ("fp32", "bf16", "fp16", "int8")
OUTER_SOCKET_ENV = "DROVER_OUTER_SOCKET"
MAX_HEADER_BYTES = 1024 * 1024
MAX_TENSORS = 65_536
MAX_PAYLOAD_BYTES = 16 * 1024 ** 3
# Limits of the agent's frames (worker/src/bridge/tensor-frame.ts FRAME_LIMITS), checked
# here too so a bad model fails in the trainer with the tensor's name, not in the agent.
MAX_TENSOR_NAME_BYTES = 512
MAX_SHAPE_RANK = 8
MAX_TIMEOUT_MS = 24 * 3600 * 1000
SOCKET_GRACE_S = 60.0  # on top of the exchange's own timeout_ms
_LENGTH = struct.Struct("<I")


class OuterSocketError(RuntimeError):
    """The exchange with the agent failed: unreachable, timed out, or broke the protocol."""


class OuterStepRefused(OuterSocketError):
    """The agent answered outer_error (a peer group failed, timed out, or disagreed)."""

    def __init__(self, message: str, outer_step: int):
        super().__init__(message)
        self.outer_step = outer_step


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape)}


@dataclass(frozen=True)
class OuterResult:
    outer_step: int
    groups: list[str]
    weights: dict[str, float]
    bytes_sent: int
    seconds: float
    codec: str
    send_state_to: list[str] = field(default_factory=list)
    rejoin: bool = False


@dataclass(frozen=True)
class JoinResult:
    mode: str  # "own" or "state"
    outer_step: int
    inner_step: int
    source: str
    groups: list[str]
    send_state_to: list[str]


def _group_list(header: dict, field: str, what: str, required: bool = True) -> list[str]:
    value = header.get(field, None if required else [])
    if not isinstance(value, list) or not all(isinstance(g, str) for g in value):
        raise OuterSocketError(f"outer socket: the answer to {what} has no list of group names in {field}: {value!r}")
    return value


def _count(header: dict, field: str, what: str) -> int:
    value = header.get(field)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise OuterSocketError(f"outer socket: the answer to {what} has no count {field}: {value!r}")
    return value


def frame(header: dict) -> bytes:
    """Length prefix and header of one message (its payload follows separately)."""
    body = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(body) > MAX_HEADER_BYTES:
        raise ValueError(f"outer-socket header of {len(body)} bytes exceeds {MAX_HEADER_BYTES} "
                         f"(kind={header.get('kind')}, {len(header.get('tensors', []))} tensors)")
    return _LENGTH.pack(len(body)) + body


def check_tensors(tensors: Sequence[TensorSpec]) -> int:
    """Validates a tensor list as the agent will; returns the payload size in bytes."""
    if not tensors:
        raise ValueError("an outer step needs at least one tensor")
    if len(tensors) > MAX_TENSORS:
        raise ValueError(f"{len(tensors)} tensors exceed the outer socket's limit of {MAX_TENSORS}")
    seen: set[str] = set()
    total = 0
    for t in tensors:
        if not t.name or len(t.name.encode("utf-8")) > MAX_TENSOR_NAME_BYTES or any(ord(c) < 0x20 for c in t.name):
            raise ValueError(f"tensor name {t.name!r} must be 1 to {MAX_TENSOR_NAME_BYTES} bytes without control characters")
        if t.name in seen:
            raise ValueError(f"tensor {t.name} is listed twice")
        seen.add(t.name)
        if len(t.shape) > MAX_SHAPE_RANK or any(not isinstance(d, int) or d < 0 or d > 2 ** 31 for d in t.shape):
            raise ValueError(f"tensor {t.name}: shape {t.shape} is not at most {MAX_SHAPE_RANK} non-negative dimensions")
        total += t.numel * 4
    if total > MAX_PAYLOAD_BYTES:
        raise ValueError(f"the outer step's tensors add up to {total} bytes, more than {MAX_PAYLOAD_BYTES}")
    return total


def request_header(outer_step: int, weight: float, codec: str, timeout_ms: int, tensors: Sequence[TensorSpec]) -> dict:
    if isinstance(outer_step, bool) or not isinstance(outer_step, int) or outer_step < 1:
        raise ValueError(f"outer_step must be an integer from 1, got {outer_step!r}")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"weight (samples since the last outer step) must be a positive number, got {weight!r}")
    if codec not in CODECS:
        raise ValueError(f"codec {codec!r} is not one of {', '.join(CODECS)}")
    if not isinstance(timeout_ms, int) or not 1 <= timeout_ms <= MAX_TIMEOUT_MS:
        raise ValueError(f"timeout_ms must be an integer from 1 to {MAX_TIMEOUT_MS}, got {timeout_ms!r}")
    return {"v": PROTOCOL_VERSION, "kind": "outer_step", "outer_step": outer_step, "weight": weight, "codec": codec,
            "timeout_ms": timeout_ms, "tensors": [t.to_json() for t in tensors]}


class Deadline:
    """One deadline shared by every socket operation of an exchange."""

    def __init__(self, seconds: float):
        self.at = time.monotonic() + seconds

    def arm(self, sock: socket.socket, doing: str) -> None:
        left = self.at - time.monotonic()
        if left <= 0:
            raise OuterSocketError(f"outer socket: timed out {doing}")
        sock.settimeout(left)


def recv_exactly_into(sock: socket.socket, view: memoryview, deadline: Deadline, what: str) -> None:
    filled = 0
    while filled < len(view):
        deadline.arm(sock, f"reading {what} ({filled} of {len(view)} bytes)")
        try:
            n = sock.recv_into(view[filled:])
        except socket.timeout:
            raise OuterSocketError(f"outer socket: timed out reading {what} ({filled} of {len(view)} bytes)") from None
        if n == 0:
            raise OuterSocketError(f"outer socket: the agent closed the connection after {filled} of {len(view)} bytes of {what}")
        filled += n


def read_header(sock: socket.socket, deadline: Deadline, who: str = "the agent") -> dict:
    """Reads one message's length prefix and JSON header (not its payload)."""
    prefix = bytearray(4)
    recv_exactly_into(sock, memoryview(prefix), deadline, "a message length")
    (length,) = _LENGTH.unpack(prefix)
    if length == 0 or length > MAX_HEADER_BYTES:
        raise OuterSocketError(f"outer socket: {who} announced a header of {length} bytes, expected 1 to {MAX_HEADER_BYTES}")
    body = bytearray(length)
    recv_exactly_into(sock, memoryview(body), deadline, "a message header")
    try:
        header = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise OuterSocketError(f"outer socket: {who} sent a header that is not UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise OuterSocketError(f"outer socket: {who} sent a header that is not a JSON object: {type(header).__name__}")
    return header


def _byte_view(buffer: Any) -> memoryview:
    view = memoryview(buffer)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


class OuterSocketClient:
    """One connection to the agent, opened on first use and kept between outer steps."""

    def __init__(self, path: str | None = None, *, sock: socket.socket | None = None):
        if path is None and sock is None:
            raise ValueError("OuterSocketClient needs a socket path or a connected socket")
        self.path = path
        self._sock = sock

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def _connected(self, deadline: Deadline) -> socket.socket:
        if self._sock is None:
            if self.path is None:
                raise OuterSocketError("outer socket: the connection was closed after an error and there is no path to reconnect to")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                deadline.arm(sock, f"connecting to {self.path}")
                sock.connect(self.path)
            except OSError as e:
                sock.close()
                raise OuterSocketError(f"outer socket: cannot connect to the agent at {self.path} ({e})") from None
            self._sock = sock
        return self._sock

    def exchange(self, *, outer_step: int, weight: float, codec: str, timeout_ms: int, tensors: Sequence[TensorSpec],
                 payload: Iterable[Any], result: Any) -> OuterResult:
        """Sends one outer step and reads the mean into `result` (a writable buffer of
        the payload's size). `payload` is an iterable of buffers (e.g. each tensor's
        float32 bytes) whose sizes add up to sum(numel) * 4."""
        header = request_header(outer_step, weight, codec, timeout_ms, tensors)
        size = check_tensors(tensors)
        result_view = _byte_view(result)
        if len(result_view) != size or result_view.readonly:
            raise ValueError(f"the result buffer must be writable and hold {size} bytes, it holds {len(result_view)}")
        views = [_byte_view(part) for part in payload]
        if sum(len(v) for v in views) != size:
            raise ValueError(f"the payload buffers hold {sum(len(v) for v in views)} bytes, the tensor list describes {size}")
        deadline = Deadline(timeout_ms / 1000 + SOCKET_GRACE_S)
        return self._request(frame(header), views, deadline, lambda sock: self._receive(sock, header, result_view, deadline),
                             outer_step, size)

    def join(self, *, outer_step: int, inner_step: int, timeout_ms: int, tensors: Sequence[TensorSpec], result: Any) -> JoinResult:
        """Asks whether a live group is further along; for mode "state" its outer
        parameters then momentum are read into `result` (2x the tensors' fp32 bytes)."""
        if not isinstance(timeout_ms, int) or not 1 <= timeout_ms <= MAX_TIMEOUT_MS:
            raise ValueError(f"timeout_ms must be an integer from 1 to {MAX_TIMEOUT_MS}, got {timeout_ms!r}")
        size = 2 * check_tensors(tensors)
        result_view = _byte_view(result)
        if len(result_view) != size or result_view.readonly:
            raise ValueError(f"the result buffer must be writable and hold {size} bytes, it holds {len(result_view)}")
        header = {"v": PROTOCOL_VERSION, "kind": "join", "outer_step": int(outer_step), "inner_step": int(inner_step),
                  "timeout_ms": timeout_ms, "tensors": [t.to_json() for t in tensors]}
        what = f"the join at outer step {outer_step}"
        deadline = Deadline(timeout_ms / 1000 + SOCKET_GRACE_S)

        def receive(sock: socket.socket) -> JoinResult:
            answer = self._answer(sock, deadline, "join_result", what, outer_step)
            mode = answer.get("mode")
            if mode not in ("own", "state"):
                raise OuterSocketError(f"outer socket: the answer to {what} has mode {mode!r}, expected own or state")
            if answer.get("tensors") != header["tensors"]:
                raise OuterSocketError(f"outer socket: the answer to {what} lists other tensors than the request "
                                       f"({_first_difference(header['tensors'], answer.get('tensors'))})")
            source = answer.get("from")
            if not isinstance(source, str):
                raise OuterSocketError(f"outer socket: the answer to {what} names no group it came from: {source!r}")
            joined = JoinResult(mode=mode, outer_step=_count(answer, "outer_step", what), inner_step=_count(answer, "inner_step", what),
                                source=source, groups=_group_list(answer, "groups", what),
                                send_state_to=_group_list(answer, "send_state_to", what))
            if mode == "state":
                recv_exactly_into(sock, result_view, deadline, f"group {source}'s outer state")
            return joined

        return self._request(frame(header), [], deadline, receive, outer_step)

    def share_state(self, *, outer_step: int, inner_step: int, tensors: Sequence[TensorSpec], payload: Iterable[Any],
                    timeout_ms: int = 600_000) -> list[str]:
        """Sends this group's outer parameters then momentum (buffers adding up to 2x the
        tensors' fp32 bytes) to the groups waiting for them; returns those it reached."""
        size = 2 * check_tensors(tensors)
        views = [_byte_view(part) for part in payload]
        if sum(len(v) for v in views) != size:
            raise ValueError(f"the state buffers hold {sum(len(v) for v in views)} bytes, the tensor list describes {size}")
        header = {"v": PROTOCOL_VERSION, "kind": "state", "outer_step": int(outer_step), "inner_step": int(inner_step),
                  "tensors": [t.to_json() for t in tensors]}
        what = f"the state of outer step {outer_step}"
        deadline = Deadline(timeout_ms / 1000 + SOCKET_GRACE_S)

        def receive(sock: socket.socket) -> list[str]:
            return _group_list(self._answer(sock, deadline, "state_sent", what, outer_step), "groups", what)

        return self._request(frame(header), views, deadline, receive, outer_step, size)

    def _request(self, message: bytes, views: list[memoryview], deadline: Deadline, receive: Any, step: int, size: int = 0) -> Any:
        """Sends one request and reads its answer with `receive`; any failure closes the
        connection (its byte stream is out of step) and the next request connects anew."""
        try:
            sock = self._connected(deadline)
            self._send(sock, message, views, size, deadline)
            answer = receive(sock)
            if _closed_or_stray(sock, step):
                self.close()  # the agent hung up after answering
            return answer
        except OuterSocketError:
            self.close()
            raise
        except OSError as e:
            self.close()
            raise OuterSocketError(f"outer socket {self.path or '(connected socket)'}: outer step {step} failed ({e})") from None
        except BaseException:
            self.close()  # e.g. KeyboardInterrupt mid-message: the stream is out of step
            raise

    @staticmethod
    def _answer(sock: socket.socket, deadline: Deadline, kind: str, what: str, step: int) -> dict:
        header = read_header(sock, deadline)
        if header.get("v") != PROTOCOL_VERSION:
            raise OuterSocketError(f"outer socket: the agent answered protocol version {header.get('v')!r}, expected {PROTOCOL_VERSION}")
        if header.get("kind") == "outer_error":
            message = header.get("error")
            raise OuterStepRefused(f"{what} failed in the agent: {message if isinstance(message, str) else header}", step)
        if header.get("kind") != kind:
            raise OuterSocketError(f"outer socket: unexpected answer kind {header.get('kind')!r} to {what} (expected {kind} or outer_error)")
        return header

    @staticmethod
    def _send(sock: socket.socket, message: bytes, payload: list[memoryview], size: int, deadline: Deadline) -> None:
        deadline.arm(sock, "sending the request header")
        sock.sendall(message)
        sent = 0
        for view in payload:
            deadline.arm(sock, f"sending the payload ({sent} of {size} bytes)")
            try:
                sock.sendall(view)
            except socket.timeout:
                raise OuterSocketError(f"outer socket: timed out sending the payload ({sent} of {size} bytes)") from None
            sent += len(view)

    @staticmethod
    def _receive(sock: socket.socket, request: dict, result: memoryview, deadline: Deadline) -> OuterResult:
        step = request["outer_step"]
        header = read_header(sock, deadline)
        kind = header.get("kind")
        if header.get("v") != PROTOCOL_VERSION:
            raise OuterSocketError(f"outer socket: the agent answered protocol version {header.get('v')!r}, expected {PROTOCOL_VERSION}")
        if kind == "outer_error":
            message = header.get("error")
            if not isinstance(message, str):
                raise OuterSocketError(f"outer socket: outer_error for step {step} carries no error message: {header}")
            if header.get("outer_step") != step:
                message += f" (the agent's answer names outer step {header.get('outer_step')!r}, the request was step {step})"
            raise OuterStepRefused(f"outer step {step} failed in the agent: {message}", step)
        if kind != "outer_result":
            raise OuterSocketError(f"outer socket: unexpected answer kind {kind!r} to outer step {step} "
                                   "(expected outer_result or outer_error)")
        if header.get("outer_step") != step:
            raise OuterSocketError(f"outer socket: the agent answered outer step {header.get('outer_step')!r}, the request was step {step}")
        if header.get("tensors") != request["tensors"]:
            raise OuterSocketError(f"outer socket: the answer to outer step {step} lists other tensors than the request "
                                   f"({_first_difference(request['tensors'], header.get('tensors'))}); its payload size cannot be trusted")
        if header.get("codec") != request["codec"]:
            raise OuterSocketError(f"outer socket: the answer to outer step {step} has codec {header.get('codec')!r}, "
                                   f"the request asked for {request['codec']!r}")
        groups, weights = header.get("groups"), header.get("weights")
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups) or not groups:
            raise OuterSocketError(f"outer socket: the answer to outer step {step} has no list of group names: {groups!r}")
        if not isinstance(weights, dict) or not all(isinstance(w, (int, float)) for w in weights.values()):
            raise OuterSocketError(f"outer socket: the answer to outer step {step} has no weights by group: {weights!r}")
        numbers = {}
        for field in ("bytes_sent", "seconds"):
            value = header.get(field)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise OuterSocketError(f"outer socket: the answer to outer step {step} has no number {field}: {value!r}")
            numbers[field] = value
        send_state_to = _group_list(header, "send_state_to", f"outer step {step}", required=False)
        rejoin = header.get("rejoin", False)
        if not isinstance(rejoin, bool):
            raise OuterSocketError(f"outer socket: the answer to outer step {step} has rejoin {rejoin!r}, expected true or false")
        recv_exactly_into(sock, result, deadline, f"the mean of outer step {step}")
        return OuterResult(outer_step=step, groups=groups, weights={k: float(v) for k, v in weights.items()},
                           bytes_sent=int(numbers["bytes_sent"]), seconds=float(numbers["seconds"]), codec=header["codec"],
                           send_state_to=send_state_to, rejoin=rejoin)


def _closed_or_stray(sock: socket.socket, step: int) -> bool:
    """Nothing may follow an answer (one request at a time): bytes already waiting mean
    the agent's payload was longer than its tensor list. Returns True when the agent
    closed the connection after answering."""
    sock.settimeout(0.0)
    try:
        stray = sock.recv(1, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        return False
    if stray:
        raise OuterSocketError(f"outer socket: the agent sent more bytes after the mean of outer step {step} "
                               "than its tensor list describes")
    return True


def _first_difference(want: list, got: Any) -> str:
    if not isinstance(got, list):
        return f"got {type(got).__name__}"
    if len(want) != len(got):
        return f"{len(got)} tensors, the request had {len(want)}"
    for w, g in zip(want, got):
        if w != g:
            return f"{g!r} where the request had {w!r}"
    return "same entries"


def socket_path_from_env(env: Mapping[str, str] | None = None) -> str | None:
    """DROVER_OUTER_SOCKET, or None where the agent did not set it."""
    env = os.environ if env is None else env
    return env.get(OUTER_SOCKET_ENV) or None
