"""The suite's network guard (tests/network_guard, installed by conftest.py) refuses and logs
every connection and name lookup outside loopback, in this process and in subprocesses, and
lets loopback through (the tests' own servers and the multi-process coordinators use it).

Each test points the guard's log at its own file, so that its deliberate attempts do not fail
it through the suite-wide check.
"""

import socket
import subprocess
import sys
import threading

import mcckd_network_guard
import pytest


@pytest.fixture
def own_log(tmp_path, monkeypatch):
    log = tmp_path / "network.log"
    monkeypatch.setenv("MCCKD_NETWORK_LOG", str(log))
    return log


@pytest.mark.parametrize("target", [("10.255.255.1", 80), ("huggingface.co", 443),
                                    ("2001:db8::1", 443)])
def test_outside_loopback_is_refused_and_logged(own_log, target):
    with pytest.raises(mcckd_network_guard.NetworkBlocked):
        socket.create_connection(target, timeout=1)
    assert repr(target[0]) in own_log.read_text()


def test_name_lookups_are_refused(own_log):
    with pytest.raises(mcckd_network_guard.NetworkBlocked):
        socket.getaddrinfo("example.com", 443)
    assert "'example.com'" in own_log.read_text()


def test_loopback_is_allowed(own_log):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        accepted = threading.Thread(target=lambda: server.accept()[0].close())
        accepted.start()
        with socket.create_connection(("localhost", server.getsockname()[1]), timeout=5):
            pass
        accepted.join(timeout=5)
    assert not own_log.exists()


def test_subprocesses_are_guarded_too(own_log):
    code = ("import socket\n"
            "try:\n    socket.create_connection(('93.184.216.34', 80), timeout=1)\n"
            "except ConnectionRefusedError as error:\n    print(type(error).__name__)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.stdout.strip() == "NetworkBlocked", done.stderr
    assert "'93.184.216.34'" in own_log.read_text()
