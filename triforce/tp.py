"""Tensor-parallel launch plumbing (GitHub issue 7): sizes, devices, the process group, consistency.

`torchrun --nproc_per_node=N -m triforce.generate ... tp=N` starts N processes; each shards the
target (and the retrieval tier, which runs the target's weights) over heads and MLP columns
(`triforce.models.llama`) and runs the same engine in lockstep. Everything here runs before the
weights are loaded, so a launch that cannot work fails at once with what to change.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class Launch:
    """Where this process sits: tp size, its rank, and its place on this host (from torchrun's env)."""

    tp: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world: int = 1  # processes of this launch on this host (share its GPUs and host memory)


def resolve_launch(tp: int | None) -> Launch:
    """Check `tp` against torchrun's WORLD_SIZE; tp=None takes the world size (1 without torchrun).

    Tensor parallelism is the only multi-process mode, so the two must agree.
    """
    env = os.environ
    world = int(env["WORLD_SIZE"]) if "WORLD_SIZE" in env else None
    if tp is None:
        tp = world or 1
    tp = int(tp)
    if tp < 1:
        raise ValueError(f"tp must be >= 1 (or null to take torchrun's world size), got {tp}")
    if world is None and tp > 1:
        raise ValueError(f"tp={tp} needs one process per rank: launch with "
                         f"`torchrun --nproc_per_node={tp} -m triforce.generate ... tp={tp}` (or set tp=1)")
    if world is not None and world != tp:
        raise ValueError(f"tp={tp} but torchrun started {world} processes (WORLD_SIZE={world}): tensor parallelism "
                         f"is the only multi-process mode, so use --nproc_per_node={tp} or tp={world} (or leave tp unset)")
    if tp == 1:
        return Launch()
    return Launch(tp, int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)),
                  int(env.get("LOCAL_WORLD_SIZE", tp)))


def rank_device(device: torch.device, launch: Launch) -> torch.device:
    """On CUDA each rank takes cuda:LOCAL_RANK (and makes it current, as NCCL needs); CPU stays CPU."""
    if launch.tp == 1 or device.type != "cuda":
        return device
    if device.index is not None:
        raise ValueError(f"device={device} with tp={launch.tp}: each rank uses cuda:LOCAL_RANK; "
                         f"pass device=cuda (or auto) and pick GPUs with CUDA_VISIBLE_DEVICES")
    n = torch.cuda.device_count()
    if launch.local_world > n or launch.local_rank >= n:
        raise RuntimeError(f"tp={launch.tp}: {launch.local_world} processes on this machine need one GPU each but "
                           f"{n} {'is' if n == 1 else 'are'} visible: use --nproc_per_node={n} tp={n} (or fewer), "
                           f"or device=cpu")
    torch.cuda.set_device(launch.local_rank)
    return torch.device("cuda", launch.local_rank)


def init_group(device: torch.device, launch: Launch, timeout_minutes: float = 30) -> dist.ProcessGroup | None:
    """The process group of the tp ranks (None for tp=1): NCCL on CUDA, gloo on CPU.

    Reuses an existing default group (a caller that initialised torch.distributed itself).
    """
    if launch.tp == 1:
        return None
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=timeout_minutes))
    if dist.get_world_size() != launch.tp:
        raise ValueError(f"tp={launch.tp} but the initialised process group has {dist.get_world_size()} ranks")
    return dist.group.WORLD


def flat(tree, prefix: str = "") -> dict:
    """A nested config as {dotted.key: value}; long strings (prompts) as a digest, to gather cheaply."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, str) and len(tree) > 200:
        tree = f"<{len(tree)} chars, sha256 {hashlib.sha256(tree.encode()).hexdigest()[:12]}>"
    return {prefix.rstrip("."): tree}


def check_same(values: dict, group: dist.ProcessGroup | None, what: str) -> None:
    """Raise on every rank unless all ranks of `group` hold equal `values`; name the ranks and keys that differ.

    Ranks that disagree on shapes or steps would deadlock in their collectives, or silently mix
    two models, so a resolved config (or a generate call's inputs) is compared once up front.
    """
    if group is None:
        return
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, values, group=group)
    ref, lines = gathered[0], []
    for r, v in enumerate(gathered[1:], 1):
        keys = sorted(k for k in set(ref) | set(v) if ref.get(k, "<unset>") != v.get(k, "<unset>"))
        if keys:
            shown = ", ".join(f"{k}={v.get(k, '<unset>')!r} (rank 0: {ref.get(k, '<unset>')!r})" for k in keys[:4])
            lines.append(f"rank {r} has {shown}" + (f" and {len(keys) - 4} more" if len(keys) > 4 else ""))
    if lines:
        raise ValueError(f"{what} differs across tensor-parallel ranks: {'; '.join(lines)}. Every rank must get "
                         f"the same overrides and inputs")
