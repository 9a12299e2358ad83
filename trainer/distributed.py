"""Process group set-up from the env that torchrun and the Kubeflow PyTorchJob operator set."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trainer.config import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


GLOO_PEER_ERRORS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Timed out waiting")


def lost_peer(exc: BaseException) -> bool:
    """A collective failed because another rank went away or stopped answering: NCCL and the c10d store raise
    torch.distributed.DistError; gloo raises a plain RuntimeError that says so in its text."""
    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in GLOO_PEER_ERRORS)


LAUNCH_HINT = "torchrun sets these variables: launch with `torchrun ... -m trainer`, or unset them to run one process"


def env_int(name: str, default: int, least: int = 0) -> int:
    """A whole-number launch variable (RANK, WORLD_SIZE, ...); ConfigError naming it when it is not one."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < least:
        raise ConfigError(f"environment: {name}={text!r} is not a whole number >= {least} ({LAUNCH_HINT})")
    return value


def env_world_size() -> int:
    return env_int("WORLD_SIZE", 1, least=1)


def setup(backend: str = "auto", timeout_seconds: int = 1800) -> DistInfo:
    """Join the process group described by RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (if any).

    NCCL on ``cuda:LOCAL_RANK`` when CUDA is available, gloo on the CPU otherwise.
    """
    rank, world_size = env_int("RANK", 0), env_world_size()
    local_rank, local_world_size = env_int("LOCAL_RANK", 0), env_int("LOCAL_WORLD_SIZE", 1, least=1)
    # torchrun sets GROUP_RANK; the operator sets PET_NODE_RANK for torchrun to read.
    node_rank = env_int("GROUP_RANK", env_int("PET_NODE_RANK", 0))
    if rank >= world_size:
        raise ConfigError(f"environment: RANK={rank} with WORLD_SIZE={world_size} (ranks are 0..WORLD_SIZE-1; "
                          f"{LAUNCH_HINT})")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if world_size > 1 and not os.environ.get(name)]
    if missing:
        raise ConfigError(f"environment: WORLD_SIZE={world_size} but {' and '.join(missing)} not set ({LAUNCH_HINT})")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("dist.backend: nccl needs CUDA GPUs and this process sees none (use auto or gloo)")
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    if use_cuda and local_rank >= torch.cuda.device_count():
        raise ConfigError(f"LOCAL_RANK {local_rank} but this node has {torch.cuda.device_count()} visible GPU(s): "
                          "give torchrun --nproc_per_node at most the number of GPUs")
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        chosen = backend if backend != "auto" else ("nccl" if use_cuda else "gloo")
        dist.init_process_group(
            backend=chosen,
            timeout=datetime.timedelta(seconds=timeout_seconds),
            device_id=device if chosen == "nccl" else None,
        )
    return DistInfo(rank, world_size, local_rank, local_world_size, node_rank, device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few host numbers over all ranks (one collective)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's `obj` (small, picklable), in rank order."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank src's `obj` (small, picklable) on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def broadcast_parameters(module: torch.nn.Module, src: int = 0) -> None:
    """Start every rank from rank 0's weights and buffers (what DDP does at construction)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def average_buffers(module: torch.nn.Module, world_size: int) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over ranks in one collective, so that
    evaluation and checkpoints see the same model on every rank."""
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if world_size == 1 or not buffers:
        return
    flat = torch.cat([b.reshape(-1) for b in buffers])
    dist.all_reduce(flat)
    flat.div_(world_size)
    offset = 0
    for b in buffers:
        b.copy_(flat[offset:offset + b.numel()].view_as(b))
        offset += b.numel()
