"""Process groups and device meshes for torchrun (single- and multi-node): NCCL on CUDA, gloo on CPU.

``init_distributed`` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); a plain
``python -m bagel_core.train`` (no ``WORLD_SIZE``) runs as rank 0 of 1 and
gets a one-process group of its own (a file store in a temporary folder), so one code path (FSDP2,
DCP) serves one process and many. The FSDP mesh follows upstream's flags:
``FULL_SHARD`` shards over all ranks (1-D mesh), ``HYBRID_SHARD`` replicates over ``num_replicate``
groups of ``num_shard`` ranks (2-D mesh ``(replicate, shard)``), ``NO_SHARD`` replicates everywhere
(2-D mesh with a shard dimension of 1).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

#: How long a collective may wait before the run fails (upstream's NCCL default of 10 min hides hangs).
DEFAULT_TIMEOUT = timedelta(minutes=10)

_ONE_PROCESS_STORES: list[str] = []  # file:// rendezvous files of one-process groups made here


@dataclass(frozen=True)
class Distributed:
    """Where this process sits: rank, world size, device, and the FSDP mesh (None for one process)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """A process group exists (collectives work, even with one rank)."""
        return self.mesh is not None


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    return int(raw) if raw else default


def pick_device(local_rank: int) -> torch.device:
    """CUDA device ``local_rank`` when CUDA is usable, else the CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(
    sharding_strategy: str = "FULL_SHARD",
    num_replicate: int = 1,
    num_shard: int | None = None,
    timeout: timedelta = DEFAULT_TIMEOUT,
) -> Distributed:
    """Join torchrun's process group (if any) and build the FSDP mesh; see the module docstring."""
    world = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    device = pick_device(local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        device_id = device if device.type == "cuda" else None
        if "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, timeout=timeout, device_id=device_id)
        else:  # one process, no torchrun: a private file store
            fd, store = tempfile.mkstemp(prefix="bagel-pg-")
            os.close(fd)
            os.unlink(store)  # the file store creates it; shutdown() removes it (torch leaves it behind)
            _ONE_PROCESS_STORES.append(store)
            dist.init_process_group(
                backend, init_method=f"file://{store}", rank=0, world_size=1, timeout=timeout, device_id=device_id
            )
    mesh = build_mesh(device.type, world, sharding_strategy, num_replicate, num_shard or world)
    return Distributed(rank, world, local_rank, device, mesh)


def build_mesh(device_type: str, world: int, strategy: str, num_replicate: int, num_shard: int) -> DeviceMesh:
    """The FSDP2 mesh for upstream's sharding strategy (1-D: shard; 2-D: replicate x shard)."""
    if strategy == "FULL_SHARD":
        return init_device_mesh(device_type, (world,), mesh_dim_names=("shard",))
    if strategy == "NO_SHARD":
        num_replicate, num_shard = world, 1
    if num_replicate * num_shard != world:
        raise ValueError(f"mesh {num_replicate} x {num_shard} does not cover {world} ranks")
    return init_device_mesh(device_type, (num_replicate, num_shard), mesh_dim_names=("replicate", "shard"))


def all_reduce_sum(values: list[float], dist_info: Distributed) -> list[float]:
    """Sum a few numbers over all ranks in one collective (fp64, so token counts stay exact)."""
    if not dist_info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=dist_info.device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(value: float, dist_info: Distributed) -> float:
    if not dist_info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=dist_info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def barrier(dist_info: Distributed) -> None:
    if dist_info.enabled:
        dist.barrier()


def broadcast_object(obj: object, dist_info: Distributed) -> object:
    """Rank 0's ``obj`` on every rank (a small picklable value: a path, a decision)."""
    if not dist_info.enabled:
        return obj
    box = [obj if dist_info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown(dist_info: Distributed) -> None:
    """Leave the process group (torchrun's, or the one-process group made here) and remove its store file."""
    if dist.is_initialized():
        dist.destroy_process_group()
    while _ONE_PROCESS_STORES:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_ONE_PROCESS_STORES.pop())
