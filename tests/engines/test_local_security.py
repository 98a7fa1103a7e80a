"""The local engine's torch rendezvous stays on the address Ray uses (loopback for the embedded cluster)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from alia_nemo.config.compose import load_config
from alia_nemo.engines import local
from tests.helpers import save_peaked_tiny_model, uneven_overrides, write_uneven_conversations

pytestmark = pytest.mark.slow
_real_train_loop = local._train_loop  # what the probe runs after looking around


def _decode(hex_addr: str) -> str:
    """An address of /proc/net/tcp{,6} (32-bit words in host order, little-endian here) as text."""
    raw = bytes.fromhex(hex_addr)
    host_order = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, host_order)


def listening_addresses(port: int) -> list[str]:
    """Every local address a TCP socket listens on at ``port``, IPv4 and IPv6, from the kernel's own tables."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            addr, hex_port = fields[1].split(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.append(_decode(addr))
    return found


def outside_addresses() -> list[str]:
    """This machine's non-loopback IPv4 addresses (where a neighbour on the network would connect)."""
    import ipaddress

    import psutil

    addrs = {a.address for nic in psutil.net_if_addrs().values() for a in nic if a.family == socket.AF_INET}
    with contextlib.suppress(OSError):
        addrs.add(socket.gethostbyname(socket.gethostname()))
    return sorted(a for a in addrs if not ipaddress.ip_address(a).is_loopback)


def _connect(address: str, port: int) -> str:
    try:
        with socket.create_connection((address, port), timeout=3):
            return "connected"
    except ConnectionRefusedError:
        return "refused"
    except OSError as exc:
        return f"error: {exc}"


def _probing_loop(config: dict[str, Any]) -> None:
    """The engine's train loop, after rank 0 recorded where the rendezvous store listens and who can reach it."""
    import ray.train

    if ray.train.get_context().get_world_rank() == 0:
        port = int(os.environ["MASTER_PORT"])
        record = {
            "master_addr": os.environ["MASTER_ADDR"],
            "port": port,
            "listening": listening_addresses(port),
            "from_outside": {a: _connect(a, port) for a in outside_addresses()},
            "gloo_ifname": os.environ.get("GLOO_SOCKET_IFNAME"),
        }
        Path(config["output_dir"], "rendezvous-probe.json").write_text(json.dumps(record))
    _real_train_loop(config)


def test_rendezvous_store_listens_on_loopback_only(tmp_path, monkeypatch):
    model_dir = save_peaked_tiny_model(tmp_path / "peaked")
    data_file = write_uneven_conversations(tmp_path / "uneven.jsonl")
    cfg = load_config(["recipe=sft-alia-tiny-1n0g-dp2", *uneven_overrides(model_dir, data_file, tmp_path / "run", 2)])
    # Ray pickles the loop by reference, so the workers import this module and run the probe.
    monkeypatch.setattr(local, "_train_loop", _probing_loop)

    summary = local.run_local(cfg)
    assert (summary["train"]["world_size"], summary["train"]["global_step"]) == (2, 2)  # DDP still trains
    probe = json.loads((tmp_path / "run" / "rendezvous-probe.json").read_text())
    assert probe["listening"] == ["127.0.0.1"], probe  # not 0.0.0.0 / :: (every interface)
    # A neighbour on the network can not reach the store (where the machine has a non-loopback address).
    assert all(result == "refused" for result in probe["from_outside"].values()), probe
    assert probe["master_addr"] == "127.0.0.1", probe  # the address the other ranks join
    assert probe["gloo_ifname"] == "lo", probe  # gloo's pair sockets on loopback too
