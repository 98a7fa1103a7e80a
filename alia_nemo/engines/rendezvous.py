"""The training workers' ``torch.distributed`` rendezvous, bound to the address Ray gave the node.

Ray Train's own setup (``TorchConfig`` with ``init_method="env"``) has rank 0 start torch's ``TCPStore`` server
with no socket of its own: torch then listens on every interface (``::`` / ``0.0.0.0``) and the store takes any
client that connects, with no authentication. Anyone who can reach the machine could join or poison the
rendezvous of a run whose embedded Ray was promised to stay on loopback. Here instead:

- rank 0 binds the store's listening socket itself, to the node address Ray gave the worker (127.0.0.1 on the
  embedded cluster, the node IP Ray reports on an external one), and hands it to ``TCPStore``
  (``master_listen_fd``, which takes ownership of it);
- every rank pins gloo's pair sockets to the interface holding its own node address (``GLOO_SOCKET_IFNAME``;
  unset, gloo binds to whatever the host name resolves to); NCCL's bootstrap sockets too, on loopback only (on
  a cluster NCCL's own choice of interface, InfiniBand first, is kept);
- the process group is created from that store before transformers' Trainer runs; accelerate finds it
  initialised and uses it, with the RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT variables set as Ray
  sets them.

Ray's own ports (GCS, raylet, object manager, agents, each worker's core-worker server): on the embedded cluster
they listen on loopback too (``alia_nemo.engines.local._init_ray`` lists them); on an external cluster they listen
where that cluster's nodes were started. Ray >= 2.60 puts token authentication on them (on by default for an
embedded ``ray.init()``; ``RAY_AUTH_MODE=disabled`` turns it off).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ray.train.backend import Backend
from ray.train.torch import TorchConfig

logger = logging.getLogger(__name__)

# The store rank 0 started in on_start's first call, picked up by its second (same worker process).
_SERVER: dict[str, Any] = {}


def node_address(loopback: bool) -> str:
    """The address this worker's rendezvous sockets use: 127.0.0.1 for the embedded cluster, else the node's
    address as registered with Ray (what ``ray status`` shows).

    Not ``ray.util.get_node_ip_address()``: in a worker it is the address of the route to 8.8.8.8, and even
    ``ray.init(_node_ip_address="127.0.0.1")`` is turned into that outward address by Ray.
    """
    if loopback:
        return "127.0.0.1"
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == node_id and node.get("NodeManagerAddress"):
            return node["NodeManagerAddress"]
    return ray.util.get_node_ip_address()


def interface_of(address: str) -> str | None:
    """The name of the network interface holding ``address`` (``lo`` for 127.0.0.1); None if none does."""
    import psutil  # accelerate's dependency, so always installed alongside transformers' Trainer

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%", 1)[0] == address for a in addrs):
            return name
    return None


def pin_interfaces(address: str, backend: str) -> None:
    """Keep the collective backend's own sockets on the interface holding ``address``.

    An interface the user chose (``GLOO_SOCKET_IFNAME``, ``NCCL_SOCKET_IFNAME`` already set) is kept.
    """
    iface = interface_of(address)
    if iface is None:
        logger.warning("no interface holds %s; gloo picks its own (the host name's address)", address)
        return
    os.environ.setdefault("GLOO_SOCKET_IFNAME", iface)
    if "nccl" in backend and address_is_loopback(address):
        os.environ.setdefault("NCCL_SOCKET_IFNAME", iface)


def address_is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8 and ::1."""
    import ipaddress

    return ipaddress.ip_address(address).is_loopback


def start_store_server(world_size: int, timeout_s: float, loopback: bool) -> tuple[str, int]:
    """On rank 0: start the ``TCPStore`` server on a socket bound to :func:`node_address`; returns (address, port).

    The server does not wait for the other ranks here; :func:`init_process_group` joins them.
    """
    import torch.distributed as dist

    address = node_address(loopback)
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((address, 0))
        port = sock.getsockname()[1]
    except OSError:
        sock.close()
        raise
    # TCPStore owns the descriptor from here on (it closes it with the server).
    _SERVER["store"] = dist.TCPStore(
        address,
        port,
        world_size,
        is_master=True,
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
        master_listen_fd=sock.detach(),
    )
    return address, port


def init_process_group(
    backend: str, world_rank: int, world_size: int, address: str, port: int, timeout_s: float, loopback: bool
) -> None:
    """On every rank: join the store rank 0 started and create the default process group from it."""
    import torch.distributed as dist

    pin_interfaces(node_address(loopback), backend)
    if "nccl" in backend and "TORCH_NCCL_BLOCKING_WAIT" not in os.environ:
        # As Ray does: fail a timed-out NCCL collective instead of hanging.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    timeout = timedelta(seconds=timeout_s)
    if world_rank == 0:
        store = _SERVER.pop("store")
    else:
        store = dist.TCPStore(address, port, world_size, is_master=False, timeout=timeout)
    # What torch's env:// rendezvous and accelerate read; the store is already up at this address.
    os.environ["MASTER_ADDR"] = address
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group(backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout)


def set_rank_env() -> None:
    """Set the torchrun-style variables transformers/accelerate read (Ray's TorchConfig sets the same)."""
    import ray.train
    from ray.train.torch import get_device

    ctx = ray.train.get_context()
    os.environ["LOCAL_RANK"] = str(ctx.get_local_rank())
    os.environ["LOCAL_WORLD_SIZE"] = str(ctx.get_local_world_size())
    os.environ["NODE_RANK"] = str(ctx.get_node_rank())
    os.environ["RANK"] = str(ctx.get_world_rank())
    os.environ["WORLD_SIZE"] = str(ctx.get_world_size())
    os.environ["ACCELERATE_TORCH_DEVICE"] = str(get_device())


def destroy_process_group() -> None:
    """Tear down the default process group (and with it the store) if there is one."""
    import torch.distributed as dist

    _SERVER.clear()
    if dist.is_initialized():
        dist.destroy_process_group()


class _BoundTorchBackend(Backend):
    """Ray Train backend that sets up the process group through :func:`start_store_server`."""

    share_cuda_visible_devices = True  # as Ray's own torch backend: NCCL needs to see its peers' GPUs

    def on_start(self, worker_group: Any, backend_config: BoundTorchConfig) -> None:
        """Start rank 0's store, then create the process group on every worker."""
        import ray

        backend = backend_config.backend
        if backend is None:
            backend = "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo"
        world_size = len(worker_group)
        loopback = backend_config.loopback
        address, port = worker_group.execute_single(
            0, start_store_server, world_size=world_size, timeout_s=backend_config.timeout_s, loopback=loopback
        )
        ray.get(
            [
                worker_group.execute_single_async(
                    rank,
                    init_process_group,
                    backend=backend,
                    world_rank=rank,
                    world_size=world_size,
                    address=address,
                    port=port,
                    timeout_s=backend_config.timeout_s,
                    loopback=loopback,
                )
                for rank in range(world_size)
            ]
        )

    def on_training_start(self, worker_group: Any, backend_config: BoundTorchConfig) -> None:
        """Set the rank variables (the train context exists from here on, on Ray Train v1 and v2)."""
        worker_group.execute(set_rank_env)

    def on_shutdown(self, worker_group: Any, backend_config: BoundTorchConfig) -> None:
        """Destroy the process groups; a worker stuck in a collective does not hold up the shutdown."""
        import ray
        from ray.exceptions import GetTimeoutError

        try:
            ray.get(worker_group.execute_async(destroy_process_group), timeout=30)
        except GetTimeoutError:
            logger.warning("torch process group shutdown timed out after 30 s")


@dataclass
class BoundTorchConfig(TorchConfig):
    """``TorchConfig`` whose rendezvous listens only on the node's Ray address (see the module docstring).

    ``loopback``: the workers all run on this machine (the embedded cluster); keep everything on 127.0.0.1.
    """

    loopback: bool = False

    @property
    def backend_cls(self) -> type[Backend]:
        """The backend Ray Train instantiates on the controller."""
        return _BoundTorchBackend
