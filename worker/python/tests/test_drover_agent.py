import io
import json
import math
import os
import socket
import threading

import pytest

from drover_agent import MAX_LINE_BYTES, Agent, TrainerEnv


class AgentServer:
    """A stand-in for the worker agent: a unix socket server collecting NDJSON lines."""

    def __init__(self, path: str):
        self.path = path
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(1)
        self.data = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        self.conn, _ = self.server.accept()
        with self.conn:
            while chunk := self.conn.recv(65536):
                self.data += chunk

    def drop(self):
        """The agent dies: the connection and the listening socket go away."""
        self.conn.shutdown(socket.SHUT_RDWR)
        self.thread.join(timeout=10)
        self.server.close()
        os.unlink(self.path)

    def lines(self) -> list[bytes]:
        self.thread.join(timeout=10)
        self.server.close()
        return self.data.split(b"\n")[:-1]


@pytest.fixture
def sock_path(tmp_path):
    # unix socket paths are limited to ~107 bytes; pytest tmp paths can be longer.
    path = os.path.join("/tmp", f"drover-agent-test-{os.getpid()}-{id(tmp_path)}.sock")
    yield path
    if os.path.exists(path):
        os.unlink(path)


def test_metric_and_checkpoint_lines_arrive_on_the_socket(sock_path, tmp_path):
    server = AgentServer(sock_path)
    log = io.StringIO()
    agent = Agent.from_env({"DROVER_AGENT_SOCKET": sock_path, "RANK": "3"}, log=log)
    agent.metric(12, loss=0.25, lr=1e-4, tokens=4096)
    agent.checkpoint(100, str(tmp_path / "100"), ["model.rank3.pt", "trainer.rank3.json"])
    agent.close()
    lines = server.lines()
    messages = [json.loads(line) for line in lines]
    assert messages == [
        {"v": 1, "kind": "metric", "rank": 3, "step": 12, "values": {"loss": 0.25, "lr": 1e-4, "tokens": 4096}},
        {"v": 1, "kind": "checkpoint", "rank": 3, "step": 100, "dir": str(tmp_path / "100"),
         "files": ["model.rank3.pt", "trainer.rank3.json"]},
    ]
    assert log.getvalue() == ""  # connected: nothing printed


def test_without_a_socket_it_prints_the_messages():
    log = io.StringIO()
    agent = Agent.from_env({}, log=log)
    agent.metric(1, loss=0.5)
    agent.checkpoint(2, "/ckpt/2", ["a.pt"])
    printed = log.getvalue().splitlines()
    assert [json.loads(line.removeprefix("drover: "))["kind"] for line in printed] == ["metric", "checkpoint"]


def test_a_missing_socket_is_harmless(tmp_path, capsys):
    log = io.StringIO()
    agent = Agent(str(tmp_path / "nobody-listens.sock"), log=log)
    for step in range(3):
        agent.metric(step, loss=1.0)
    assert len(log.getvalue().splitlines()) == 3  # every message still printed
    assert capsys.readouterr().err.count("unusable") == 1  # the failure is logged once


def test_agent_going_away_mid_run_does_not_crash(sock_path, capsys):
    server = AgentServer(sock_path)
    log = io.StringIO()
    agent = Agent(sock_path, log=log)
    agent.metric(1, loss=1.0)
    while not server.data:  # wait until the first line arrived
        server.thread.join(timeout=0.01)
    server.drop()
    for step in range(2, 50):
        agent.metric(step, loss=1.0)
    agent.close()
    assert json.loads(server.data)["step"] == 1
    assert capsys.readouterr().err.count("unusable") == 1
    assert '"step":49' in log.getvalue()  # after the failure, messages are printed


def test_non_finite_values_are_not_sent_but_printed(sock_path):
    server = AgentServer(sock_path)
    log = io.StringIO()
    agent = Agent(sock_path, log=log)
    agent.metric(5, loss=math.nan, lr=1e-3)
    agent.close()
    assert json.loads(server.lines()[0])["values"] == {"lr": 1e-3}
    assert "loss=nan" in log.getvalue()


def test_non_numeric_metric_is_refused():
    agent = Agent(None, log=io.StringIO())
    with pytest.raises(TypeError, match="'phase' must be a number"):
        agent.metric(1, phase="warmup")
    with pytest.raises(TypeError):
        agent.metric(1, ok=True)


def test_oversized_line_is_refused_before_sending():
    agent = Agent(None, log=io.StringIO())
    with pytest.raises(ValueError, match="exceeds"):
        agent.checkpoint(1, "/ckpt/1", [f"file-{i:06d}.pt" for i in range(MAX_LINE_BYTES // 10)])


def test_checkpoint_files_must_be_relative():
    agent = Agent(None, log=io.StringIO())
    with pytest.raises(ValueError, match="relative"):
        agent.checkpoint(1, "/ckpt/1", ["/etc/passwd"])


def test_trainer_env_reads_the_contract():
    env = TrainerEnv.from_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
                               "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "DROVER_RUN_ID": "r1",
                               "DROVER_CKPT_DIR": "/ck", "DROVER_RESUME_DIR": "/ck/100"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.group_rank) == (5, 8, 1, 4, 1)
    assert (env.master_addr, env.master_port, env.run_id, env.ckpt_dir, env.resume_dir) == ("10.0.0.1", 29500, "r1", "/ck", "/ck/100")
    assert TrainerEnv.from_env({}).world_size == 1
    # Plain torchrun: one group holding every rank.
    assert (env.group_index, env.group_count, env.global_rank, env.global_world_size) == (0, 1, 5, 8)
    spanning = TrainerEnv.from_env({"RANK": "1", "WORLD_SIZE": "4", "DROVER_GROUP_INDEX": "1", "DROVER_GROUP_COUNT": "2",
                                    "DROVER_GLOBAL_RANK": "17", "DROVER_GLOBAL_WORLD_SIZE": "20"})
    assert (spanning.rank, spanning.group_index, spanning.group_count, spanning.global_rank, spanning.global_world_size) == (1, 1, 2, 17, 20)
    with pytest.raises(ValueError, match="RANK='x'"):
        TrainerEnv.from_env({"RANK": "x"})
