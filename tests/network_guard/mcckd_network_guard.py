"""Refuses every socket connection and name lookup outside loopback, in the pytest process and
(through sitecustomize.py beside this file, on PYTHONPATH) in every Python subprocess a test
starts, and records each attempt so the test that made it fails even when a library swallows
the error (huggingface_hub falls back to its cache on connection errors, for one).

Attempts are appended to the file named by $MCCKD_NETWORK_LOG (one line each), which
tests/conftest.py checks after every test.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import traceback

_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", ""}
_INSTALLED = False


class NetworkBlocked(ConnectionRefusedError):
    """A test tried to reach a host outside loopback."""


def _is_local(host) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    host = str(host).strip("[]").split("%", 1)[0]
    if host.lower() in _LOCAL_NAMES:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name that is not loopback's
    return address.is_loopback or address.is_unspecified


def _refuse(what: str, target) -> None:
    line = f"{what} {target!r} in pid {os.getpid()}: {traceback.format_stack(limit=6)[0].strip()}"
    log = os.environ.get("MCCKD_NETWORK_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(" ".join(line.split()) + "\n")
    raise NetworkBlocked(f"network access outside loopback is blocked in tests: {what} {target!r}")


def install() -> None:
    """Patches socket connect/connect_ex/getaddrinfo/gethostbyname (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    _INSTALLED = True
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex
    getaddrinfo, gethostbyname = socket.getaddrinfo, socket.gethostbyname

    def checked(address, family):
        if family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address[0]):
            _refuse("connect to", address)

    def guarded_connect(self, address):
        checked(address, self.family)
        return connect(self, address)

    def guarded_connect_ex(self, address):
        checked(address, self.family)
        return connect_ex(self, address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        if not _is_local(host):
            _refuse("name lookup of", host)
        return getaddrinfo(host, *args, **kwargs)

    def guarded_gethostbyname(host):
        if not _is_local(host):
            _refuse("name lookup of", host)
        return gethostbyname(host)

    socket.socket.connect, socket.socket.connect_ex = guarded_connect, guarded_connect_ex
    socket.getaddrinfo, socket.gethostbyname = guarded_getaddrinfo, guarded_gethostbyname


def install_if_requested() -> None:
    if os.environ.get("MCCKD_BLOCK_NETWORK") == "1":
        install()
