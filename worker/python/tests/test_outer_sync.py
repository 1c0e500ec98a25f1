import os
import re
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import outer_harness
from drover_agent import outer_socket
from drover_agent.contract import TrainerEnv
from drover_agent.outer_socket import OuterSocketClient, OuterSocketError, OuterStepRefused, TensorSpec, frame
from drover_agent.outer_sync import OuterSync, OuterSyncError

ONE_GROUP = TrainerEnv.from_env({})


def _model(*values_per_param) -> torch.nn.Module:
    model = torch.nn.Module()
    for i, values in enumerate(values_per_param):
        setattr(model, f"p{i}", torch.nn.Parameter(torch.tensor(values, dtype=torch.float32)))
    return model


def _set(model, *values_per_param):
    with torch.no_grad():
        for p, values in zip(model.parameters(), values_per_param):
            p.copy_(torch.tensor(values, dtype=torch.float32))


def test_nesterov_step_matches_a_hand_computation():
    # Binary fractions, so the hand computation is exact: outer 10, pseudo-gradients 1 then 2.
    model = _model([10.0, -4.0])
    sync = OuterSync(model, every=1, lr=0.5, momentum=0.5, env=ONE_GROUP, log=lambda line: None)
    _set(model, [9.0, -5.0])  # delta = outer - local = [1, 1]
    sync.maybe_step(1, 8)
    # m = 0.5 * 0 + 1 = 1; update = 1 + 0.5 * 1 = 1.5; outer = 10 - 0.5 * 1.5 = 9.25
    assert model.p0.tolist() == [9.25, -4.75]
    _set(model, [7.25, -6.75])  # delta = [2, 2]
    sync.maybe_step(2, 8)
    # m = 0.5 * 1 + 2 = 2.5; update = 2 + 0.5 * 2.5 = 3.25; outer = 9.25 - 0.5 * 3.25 = 7.625
    assert model.p0.tolist() == [7.625, -6.375]
    assert sync.outer_step == 2

    plain = _model([10.0])
    sync = OuterSync(plain, every=1, lr=0.5, momentum=0.5, nesterov=False, env=ONE_GROUP, log=lambda line: None)
    _set(plain, [9.0])
    sync.step(8)
    _set(plain, [7.5])  # outer 9.5 after the first step (10 - 0.5 * 1), delta 2
    sync.step(8)
    # m = 1, outer 9.5; m = 0.5 * 1 + 2 = 2.5, outer = 9.5 - 1.25
    assert plain.p0.tolist() == [8.25]


@pytest.mark.parametrize("nesterov", [True, False])
def test_every_float32_operation_is_rounded_on_its_own(nesterov):
    """The same step in numpy float32, one rounding per operation: a fused
    multiply-add anywhere (add_ with alpha on a vectorized kernel) would differ in
    some of the 4,099 elements."""
    rng = np.random.default_rng(3)
    start = rng.standard_normal(4099).astype(np.float32)
    model = _model(start.tolist())
    lr, momentum = 0.7, 0.9
    sync = OuterSync(model, every=2, lr=lr, momentum=momentum, nesterov=nesterov, env=ONE_GROUP, log=lambda line: None)
    outer, m = start.copy(), np.zeros_like(start)
    for inner in range(1, 7):
        local = model.p0.detach().numpy() + rng.standard_normal(4099).astype(np.float32) * np.float32(1e-2)
        _set(model, local.tolist())
        if sync.maybe_step(inner, 16) is None:
            continue
        g = outer - local
        m = m * np.float32(momentum) + g
        update = (g + m * np.float32(momentum)) if nesterov else m
        outer = outer - update * np.float32(lr)
        assert np.array_equal(model.p0.detach().numpy(), outer), inner
    assert sync.outer_step == 3


def test_one_group_with_lr_1_and_no_momentum_leaves_the_parameters_where_they_are():
    """outer - (outer - local) is local exactly when outer and local are within a factor
    of 2 of each other (Sterbenz): small inner updates, as here."""
    model = outer_harness.small_model()
    sync = OuterSync(model, every=1, lr=1.0, momentum=0.0, env=ONE_GROUP, log=lambda line: None)
    for step in range(1, 4):
        outer_harness.inner_update(model, step)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        report = sync.maybe_step(step, 4)
        assert report["groups"] == ["local"] and report["bytes_sent"] == 0
        for name, p in model.named_parameters():
            assert torch.equal(p.detach(), before[name]), name
        assert all(torch.equal(o, p.detach()) for o, p in zip(sync._outer, model.parameters()))


def test_state_dict_round_trips_through_torch_load_weights_only(tmp_path):
    model = outer_harness.small_model()
    sync = OuterSync(model, every=2, env=ONE_GROUP, log=lambda line: None, inner_step=4)
    for step in range(5, 9):
        outer_harness.inner_update(model, step)
        sync.maybe_step(step, 8)
    torch.save(sync.state_dict(), tmp_path / "outer.pt")
    state = torch.load(tmp_path / "outer.pt", weights_only=True)
    assert (state["outer_step"], state["last_inner_step"]) == (2, 8)

    twin_model = outer_harness.small_model()
    twin_model.load_state_dict(model.state_dict())
    twin = OuterSync(twin_model, every=2, env=ONE_GROUP, log=lambda line: None)
    twin.load_state_dict(state)
    assert (twin.outer_step, twin.last_inner_step, twin.checksum()) == (2, 8, sync.checksum())
    # Both continue identically, momentum included.
    for s, m in ((sync, model), (twin, twin_model)):
        outer_harness.inner_update(m, 9)
        outer_harness.inner_update(m, 10)
        s.maybe_step(10, 8)
    assert twin.checksum() == sync.checksum()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin_model.parameters()))

    with pytest.raises(ValueError, match="does not fit"):
        OuterSync(_model([1.0]), every=1, env=ONE_GROUP).load_state_dict(state)


def test_several_groups_without_the_socket_is_a_clear_error():
    env = TrainerEnv.from_env({"DROVER_GROUP": "a", "DROVER_GROUP_COUNT": "2"})
    with pytest.raises(OuterSyncError, match="2 groups but DROVER_OUTER_SOCKET is not set"):
        OuterSync(_model([1.0]), every=1, env=env, socket_path="")


def test_drover_agent_imports_without_torch():
    helper = os.path.dirname(os.path.dirname(os.path.abspath(outer_socket.__file__)))
    code = "import sys, drover_agent, drover_agent.outer_socket; assert 'torch' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], cwd=helper, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


# -- the wire, over a real socketpair ------------------------------------------------

SPECS = [TensorSpec("w", (2, 3)), TensorSpec("b", (3,)), TensorSpec("empty", (0, 4))]


def _exchange_against(script, *, step=1, timeout_ms=5000, specs=SPECS, payload=None):
    """Runs one exchange with `script(conn, header, payload)` playing the agent.
    Returns (result or exception, result buffer, the agent's view of the request)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    seen = {}

    def agent():
        with theirs:
            try:
                header, data = outer_harness.read_request(theirs, 10)
            except OuterSocketError:
                return
            seen.update(header=header, payload=data)
            script(theirs, header, data)

    thread = threading.Thread(target=agent, daemon=True)
    thread.start()
    client = OuterSocketClient(sock=ours)
    numel = sum(s.numel for s in specs)
    values = np.arange(numel, dtype=np.float32) if payload is None else payload
    result = np.zeros(numel, dtype=np.float32)
    try:
        outcome = client.exchange(outer_step=step, weight=96, codec="bf16", timeout_ms=timeout_ms, tensors=specs,
                                  payload=[values[:6], values[6:]], result=result)
    except Exception as e:  # noqa: BLE001 - the tests look at it
        outcome = e
    thread.join(timeout=10)
    client.close()
    return outcome, result, seen


def _answer(conn, header, data, **override):
    answer = {"v": 1, "kind": "outer_result", "outer_step": header["outer_step"], "groups": ["a", "b"],
              "weights": {"a": 96, "b": 32}, "bytes_sent": 1234, "seconds": 0.5, "codec": header["codec"],
              "tensors": header["tensors"], **override}
    conn.sendall(frame(answer) + (data * 2).astype("<f4").tobytes())


def test_a_request_and_its_answer_on_the_wire():
    outcome, result, seen = _exchange_against(_answer)
    assert seen["header"] == {"v": 1, "kind": "outer_step", "outer_step": 1, "weight": 96, "codec": "bf16", "timeout_ms": 5000,
                              "tensors": [{"name": "w", "shape": [2, 3]}, {"name": "b", "shape": [3]},
                                          {"name": "empty", "shape": [0, 4]}]}
    assert np.array_equal(seen["payload"], np.arange(9, dtype=np.float32))
    assert (outcome.groups, outcome.weights, outcome.bytes_sent, outcome.seconds, outcome.codec) == \
        (["a", "b"], {"a": 96.0, "b": 32.0}, 1234, 0.5, "bf16")
    assert np.array_equal(result, 2 * np.arange(9, dtype=np.float32))


def _raw(data: bytes):
    return lambda conn, header, payload: conn.sendall(data)


@pytest.mark.parametrize("script, error, match", [
    (lambda c, h, d: c.sendall(frame({"v": 1, "kind": "outer_error", "outer_step": 1, "error": "peer b: gone (tensor w)"})),
     OuterStepRefused, r"outer step 1 failed in the agent: peer b: gone \(tensor w\)"),
    (_raw((2 * 1024 * 1024).to_bytes(4, "little")), OuterSocketError, "header of 2097152 bytes"),
    (_raw((5).to_bytes(4, "little") + b"nope!"), OuterSocketError, "not UTF-8 JSON"),
    (_raw(frame({"v": 1, "kind": "metric"})), OuterSocketError, "unexpected answer kind 'metric'"),
    (_raw(frame({"v": 2, "kind": "outer_result"})), OuterSocketError, "protocol version 2"),
    (lambda c, h, d: _answer(c, h, d, outer_step=7), OuterSocketError, "answered outer step 7, the request was step 1"),
    (lambda c, h, d: _answer(c, h, d, tensors=h["tensors"][:2]), OuterSocketError, "other tensors.*2 tensors, the request had 3"),
    (lambda c, h, d: _answer(c, h, d, codec="int8"), OuterSocketError, "codec 'int8'"),
    (lambda c, h, d: _answer(c, h, d, groups="a"), OuterSocketError, "no list of group names"),
    (lambda c, h, d: c.sendall(frame({**_result_header(h)}) + b"\0" * 20), OuterSocketError,
     "closed the connection after 20 of 36 bytes of the mean"),
    (lambda c, h, d: c.sendall(frame({**_result_header(h)}) + b"\0" * 40), OuterSocketError, "more bytes after the mean"),
    (lambda c, h, d: None, OuterSocketError, "closed the connection after 0 of 4 bytes of a message length"),
])
def test_a_bad_answer_is_a_clear_error(script, error, match):
    outcome, _, _ = _exchange_against(script)
    assert isinstance(outcome, error), outcome
    assert re.search(match, str(outcome)), outcome


def _result_header(h):
    return {"v": 1, "kind": "outer_result", "outer_step": h["outer_step"], "groups": ["a"], "weights": {"a": 1},
            "bytes_sent": 0, "seconds": 0, "codec": h["codec"], "tensors": h["tensors"]}


def test_a_silent_agent_times_out(monkeypatch):
    monkeypatch.setattr(outer_socket, "SOCKET_GRACE_S", 0.2)
    outcome, _, _ = _exchange_against(lambda c, h, d: c.recv(1), timeout_ms=1)
    assert isinstance(outcome, OuterSocketError) and "timed out" in str(outcome)


def test_requests_are_checked_before_anything_is_sent():
    cases = [
        (dict(tensors=[TensorSpec("x", (3,)), TensorSpec("x", (0,))]), "listed twice"),
        (dict(weight=0), "positive"),
        (dict(codec="fp8"), "not one of"),
        (dict(payload=[np.zeros(2, np.float32)]), "hold 8 bytes, the tensor list describes 12"),
        (dict(tensors=[TensorSpec("x" * 600, (3,))]), "without control characters"),
        (dict(outer_step=0), "from 1"),
        (dict(result=np.zeros(2, np.float32)), "hold 12 bytes"),
    ]
    for override, match in cases:
        ours, theirs = socket.socketpair()
        kwargs = {**dict(outer_step=1, weight=8, codec="fp32", timeout_ms=1000, tensors=[TensorSpec("x", (3,))],
                         payload=[np.zeros(3, np.float32)], result=np.zeros(3, np.float32)), **override}
        with pytest.raises(ValueError, match=match):
            OuterSocketClient(sock=ours).exchange(**kwargs)
        with pytest.raises(BlockingIOError):
            theirs.recv(1, socket.MSG_DONTWAIT)
        ours.close(), theirs.close()


# -- two ranks of one group against one rank of another sharding -------------------------


def _sock_path(tag: str) -> str:
    # unix socket paths are limited to ~107 bytes; pytest tmp paths can be longer.
    return os.path.join("/tmp", f"drover-outer-{tag}-{os.getpid()}-{threading.get_ident()}.sock")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_and_one_rank_reach_the_same_outer_parameters_to_the_bit(tmp_path):
    """The same pseudo-gradients and the same answers from the agent: a group sharding
    the model over 2 ranks and a group holding it in 1 must end with identical bits
    (what lets groups of different sizes train one model). Also: a step the agent
    refuses raises the same error on both ranks, changes nothing, and can be retried."""
    two_dir, one_dir = tmp_path / "two", tmp_path / "one"
    two_dir.mkdir(), one_dir.mkdir()
    agents = [outer_harness.FakeOuterAgent(_sock_path(tag), fail={3: "peer b went silent at tensor d"}) for tag in ("two", "one")]
    try:
        mp.spawn(outer_harness.spawned_outer_run, args=(2, _free_port(), agents[0].path, str(two_dir)), nprocs=2, join=True)
        outer_harness.outer_run(0, 1, agents[1].path, str(one_dir))
    finally:
        for agent in agents:
            agent.close()
    two = [torch.load(two_dir / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    one = torch.load(one_dir / "rank0.pt", weights_only=True)

    assert one["outer_steps"] == [1, 2, 3] and one["outer_step"] == 3
    assert one["groups"] == [["a", "b"]] * 3
    for rank in two:
        assert rank["outer_steps"] == one["outer_steps"]
        assert rank["checksums"] == one["checksums"]
        assert rank["errors"] == ["group a: outer step 3: outer step 3 failed in the agent: peer b went silent at tensor d"]
        for name, value in one["outer"].items():
            assert torch.equal(rank["outer"][name], value), name
            assert torch.equal(rank["params"][name], value), name  # the model holds the outer parameters
    assert len(set(one["checksums"])) == 3
    assert one["lines"][0].startswith("outer step 1: groups a+b, 0.0 MiB sent, ") and one["lines"][0].endswith(
        f"codec fp32, checksum {one['checksums'][0][:16]}")
    assert two[1]["lines"] == []  # only rank 0 prints
    # Both agents saw the same requests: 4 (one refused and retried), weight 3 steps x 8.
    for agent in agents:
        assert [r["outer_step"] for r in agent.requests] == [1, 2, 3, 3]
        assert all(r["weight"] == 24 for r in agent.requests)
        assert [t["name"] for t in agent.requests[0]["tensors"]] == ["a", "b", "c", "d"]
        assert agent.connections == 2  # the client reconnects after an error


def test_a_failed_exchange_is_tried_again_before_it_fails_the_step(tmp_path):
    """A step the agent answers with an error (a damaged frame, a peer's link broken
    mid-step) is asked again: training goes on, and the retry is said."""
    agent = outer_harness.FakeOuterAgent(_sock_path("retry"), fail={2: "bridge frame from group b: tensor a chunk 0: checksum mismatch"})
    try:
        model = outer_harness.small_model()
        env = TrainerEnv.from_env({"DROVER_GROUP": "a", "DROVER_GROUP_COUNT": "2", "DROVER_GROUP_INDEX": "0"})
        lines: list[str] = []
        sync = OuterSync(model, every=1, env=env, socket_path=agent.path, log=lines.append)
        reports = [sync.maybe_step(step, samples_since_last=8) for step in (1, 2, 3)]
    finally:
        agent.close()
    assert [r["outer_step"] for r in reports] == [1, 2, 3]
    assert [r["outer_step"] for r in agent.requests] == [1, 2, 2, 3]
    assert any("outer step 2: the exchange failed" in line and "checksum mismatch" in line and "try 2 of 3" in line for line in lines), lines


def test_a_rejoining_group_takes_the_live_state_into_its_shards_and_sends_its_own_when_asked(tmp_path):
    """join(): the agent hands over another group's outer parameters and momentum; both
    ranks of an FSDP group take their pieces, the model holds the outer parameters and
    training continues at the live group's inner step. Then an outer step whose answer
    names a waiting group makes the ranks send their (gathered) outer state."""
    numel = sum(p.numel() for p in outer_harness.small_model().parameters())
    state = np.arange(2 * numel, dtype=np.float32) / np.float32(1000)
    agent = outer_harness.FakeOuterAgent(_sock_path("join"), join_state=state, join_at=(5, 20), send_state_to=["c"])
    try:
        mp.spawn(outer_harness.spawned_join_run, args=(2, _free_port(), agent.path, str(tmp_path)), nprocs=2, join=True)
    finally:
        agent.close()
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    names = [name for name, _ in outer_harness.small_model().named_parameters()]
    shapes = [p.shape for p in outer_harness.small_model().parameters()]
    offset, params, momentum = 0, {}, {}
    for name, shape in zip(names, shapes):
        n = int(np.prod(shape))
        params[name] = torch.from_numpy(state[offset:offset + n].copy()).view(shape)
        momentum[name] = torch.from_numpy(state[numel + offset:numel + offset + n].copy()).view(shape)
        offset += n
    for rank in ranks:
        assert rank["joined"] == {"mode": "state", "outer_step": 5, "inner_step": 20, "source": "b", "groups": ["a", "b"]}
        after = rank["after_join"]
        assert (after["outer_step"], after["last_inner_step"]) == (5, 20)
        for name in names:
            assert torch.equal(after["outer"][name], params[name]), name
            assert torch.equal(after["momentum"][name], momentum[name]), name
            assert torch.equal(after["params"][name], params[name]), name
        assert rank["report_send"] == ["c"]
    assert ranks[0]["lines"][0].startswith("joined: took group b's live outer state at outer step 5 (inner step 20); in step with a+b")
    # The state sent after outer step 6: what the ranks hold, gathered whole, params then momentum.
    requests = [r for r in agent.requests if r["kind"] == "join"]
    assert [(r["outer_step"], r["inner_step"]) for r in requests] == [(0, 8)]
    assert len(agent.states) == 1
    header, payload = agent.states[0]
    assert (header["outer_step"], header["inner_step"]) == (6, 24)
    expected = np.concatenate([ranks[0]["after_step"][kind][name].reshape(-1).numpy() for kind in ("outer", "momentum") for name in names])
    assert np.array_equal(payload, expected)
