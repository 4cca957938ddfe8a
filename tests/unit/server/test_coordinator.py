"""The coordinator's run index: which runs a restarted coordinator resumes, and the SuperLink command line."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest

from medfed.common.config import run_config_from_overrides
from medfed.common.errors import ConfigError
from medfed.server.coordinator import AUTO_RESUMED_AT, Coordinator, InterruptedRun


def _launched(coord: Coordinator, run_id: int, run_dir: Path, overrides: list[str], note=None) -> None:
    coord._remember_run(run_id, run_config_from_overrides(overrides, **{"run-dir": str(run_dir), "t0": 1.0}), note)


def test_only_runs_cut_off_are_resumed_once(tmp_path):
    # Prepare: four runs; one finished, one stopped by the operator, one resumed already, one cut off
    coord = Coordinator(tmp_path / "coord", insecure=True)
    coord.dir.mkdir()
    finished, stopped, cut = tmp_path / "finished", tmp_path / "stopped", tmp_path / "cut"
    for path in (finished, stopped, cut):
        path.mkdir()
    (finished / "summary.json").write_text("{}")
    _launched(coord, 1, finished, ["train.rounds=2"])
    _launched(coord, 2, stopped, ["train.rounds=2"])
    index = coord.runs()
    index["2"]["stopped"] = True
    coord._write_runs(index)
    _launched(coord, 3, cut, ["train.rounds=3", "model.width=8"])

    (cut / "metrics.jsonl").write_text('{"round": 1}\n')

    # Execute
    before = coord.interrupted_runs()
    # a coordinator start resumes it (same directory), after round 1
    _launched(coord, 4, cut, ["train.rounds=3", "model.width=8"], note={AUTO_RESUMED_AT: 1})
    stalled = coord.interrupted_runs()
    (cut / "metrics.jsonl").write_text('{"round": 1}\n{"round": 2}\n')  # the resumed run got further
    progressing = coord.interrupted_runs()

    # Assert: the cut-off run with its own overrides; after its resume only the new run counts, and it is
    # resumed again only if it made progress since
    overrides = ["train.rounds=3", "model.width=8"]
    assert before == [InterruptedRun(3, cut, overrides, 1)]
    assert stalled == [InterruptedRun(4, cut, overrides, 1, stalled=True)]
    assert progressing == [InterruptedRun(4, cut, overrides, 2)]
    assert json.loads((coord.dir / "runs.json").read_text())["3"]["resumed-as"] == 4


def test_superlink_serves_tls_from_the_tls_folder_with_node_auth_and_no_installs(tmp_path):
    secrets = tmp_path / "secrets"
    coord = Coordinator(tmp_path / "coord", address="0.0.0.0:9093", tls_dir=secrets)

    command = coord.superlink_command()

    assert "--enable-supernode-auth" in command and "--disable-runtime-dependency-installation" in command
    assert "--insecure" not in command
    assert command[command.index("--ssl-keyfile") + 1] == str(secrets / "server.key")
    assert command[command.index("--database") + 1] == str(coord.dir / "state.db")
    with pytest.raises(ConfigError, match=r"ca.crt is missing in .*secrets; create the coordinator's certificates"):
        coord.start()


@pytest.mark.parametrize(("address", "local"), [
    ("0.0.0.0:9093", "127.0.0.1:9093"), (":9093", "127.0.0.1:9093"), ("[::]:9093", "[::1]:9093"),
    ("10.1.2.3:9093", "10.1.2.3:9093"), ("coordinator.example.org:9093", "coordinator.example.org:9093"),
])
def test_the_coordinators_own_clients_dial_loopback_when_it_listens_on_all_interfaces(tmp_path, address, local):
    coord = Coordinator(tmp_path / "coord", address=address)

    coord.write_connection()

    assert coord.local_address == local
    assert f'address = "{local}"' in (coord.flwr_home / "config.toml").read_text()


def test_the_certificate_also_names_the_one_address_the_superlink_listens_on():
    from medfed.cli.coordinator import _with_listen_host

    assert _with_listen_host(["coordinator.example.org"], "0.0.0.0:9093") == ["coordinator.example.org"]
    assert _with_listen_host(["coordinator.example.org"], "[::]:9093") == ["coordinator.example.org"]
    assert _with_listen_host(["coordinator.example.org"], "10.1.2.3:9093") == ["coordinator.example.org", "10.1.2.3"]
    assert _with_listen_host(["10.1.2.3"], "10.1.2.3:9093") == ["10.1.2.3"]


def test_a_superlink_that_never_answers_names_the_last_reason_and_the_fix(tmp_path, monkeypatch):
    from medfed.common.errors import ServiceUnavailable
    from medfed.server.coordinator import FlowerCommandError

    coord = Coordinator(tmp_path / "coord", address="0.0.0.0:9093")

    def refuse(self, args, *, timeout=120.0):
        raise FlowerCommandError("`flwr ls medfed` failed: certificate verify failed: IP address mismatch")

    monkeypatch.setattr(Coordinator, "flwr", refuse)
    with pytest.raises(ServiceUnavailable, match=r"127\.0\.0\.1:9093 .*IP address mismatch.*renew-cert") as caught:
        coord.wait_ready(timeout=0.2)
    assert caught.value.exit_code == 10


@pytest.fixture()
def held_port():
    """A port another process listens at (this test's socket, bound to port 0 by the kernel): every connection to
    it is accepted and closed at once, as a busy service that does not speak Flower would."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop = threading.Event()

    def refuse() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                listener.accept()[0].close()
            except OSError:
                continue

    thread = threading.Thread(target=refuse, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    listener.close()


def _tls_coordinator(directory: Path, port: int) -> Coordinator:
    """A coordinator at 127.0.0.1:PORT with its CA and server certificate (SuperNode authentication needs TLS)."""
    from medfed.common.pki import create_ca, create_server_certificate, load_ca

    create_ca(directory)
    create_server_certificate(directory, load_ca(directory), ["localhost"])
    return Coordinator(directory, address=f"127.0.0.1:{port}")


def test_a_coordinator_whose_port_is_taken_says_so_before_starting_a_superlink(tmp_path, held_port):
    from medfed.common.errors import ServiceUnavailable

    coord = _tls_coordinator(tmp_path / "coord", held_port)

    with pytest.raises(ServiceUnavailable, match=rf"port {held_port} is in use by another process.*--address"):
        coord.start()
    assert not (coord.dir / "superlink.pid").exists()  # nothing was started


def test_a_port_taken_between_the_check_and_the_bind_is_named_and_the_superlink_is_gone(tmp_path, held_port,
                                                                                         monkeypatch):
    from medfed.common.errors import ServiceUnavailable
    from medfed.common.processes import pid_alive
    from medfed.server import coordinator

    monkeypatch.setattr(coordinator, "port_taken", lambda address: False)  # the port was free when checked
    coord = _tls_coordinator(tmp_path / "coord", held_port)

    with pytest.raises(ServiceUnavailable, match=rf"port {held_port} is in use by another process"):
        coord.start()
    assert not pid_alive(int((coord.dir / "superlink.pid").read_text()))


def test_port_taken_tells_a_listening_port_from_a_free_one(held_port):
    from medfed.common.processes import port_taken

    assert port_taken(f"127.0.0.1:{held_port}") and port_taken(f"0.0.0.0:{held_port}")
    assert port_taken(f":{held_port}")  # no host: every interface
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    assert not port_taken(f"127.0.0.1:{free}")  # closed again (a race here only makes the test fail, never pass)


@pytest.mark.parametrize(("address", "host", "port"), [
    ("coordinator.example.org:9092", "coordinator.example.org", 9092), ("10.1.2.3:1", "10.1.2.3", 1),
    ("[::1]:65535", "::1", 65535), ("[::]:9093", "::", 9093), (":9093", "", 9093),
])
def test_one_reader_of_host_port_addresses(address, host, port):
    from medfed.common.processes import split_address

    assert split_address(address, host_required=False) == (host, port)
    if host:
        assert split_address(address) == (host, port)


@pytest.mark.parametrize("address", ["coordinator", "coordinator:", "coordinator:0", "coordinator:65536",
                                     "coordinator:http", ":9093"])
def test_an_address_that_is_not_host_port_is_named(address):
    from medfed.common.processes import split_address

    with pytest.raises(ValueError, match=rf"^{re.escape(repr(address))} is not host:port with a port from 1 to 65535"):
        split_address(address)


@pytest.mark.parametrize(("address", "host"), [("[::]:9093", "::"), (":9093", "0.0.0.0"),
                                               ("10.1.2.3:9093", "10.1.2.3")])
def test_the_superlink_is_given_the_host_without_brackets_and_the_port(tmp_path, address, host):
    command = Coordinator(tmp_path / "coord", address=address, insecure=True).superlink_command()

    assert command[command.index("--host") + 1] == host  # Flower brackets an IPv6 host itself
    assert command[command.index("--port") + 1] == "9093"


@pytest.mark.parametrize("command", [["init", "--host", "coordinator.example.org"], ["start", "--insecure"]])
def test_a_coordinator_address_that_is_not_host_port_is_refused_before_anything_is_written(tmp_path, command):
    from typer.testing import CliRunner

    from medfed.cli.main import app

    result = CliRunner().invoke(app, ["coordinator", *command, "--dir", str(tmp_path / "coord"), "--address",
                                      "coordinator.example.org"])

    assert result.exit_code != 0
    assert "--address: 'coordinator.example.org' is not host:port" in " ".join(result.output.split())
    assert not (tmp_path / "coord" / "coordinator.json").exists() and not (tmp_path / "coord" / "ca.key").exists()
