"""Joining torchrun's processes (the method's side, slicing and averaging, is minti/distributed.py).

Under torchrun every process runs train.py; join_ranks makes them one group (nccl on CUDA, gloo on the
CPU), and all_stop lets a stop signal that reached one rank stop every rank after the same step.
"""
import os

import torch
import torch.distributed as dist

from .cli import UsageError
from .devices import pick_device


def join_ranks(batch, device_name):
    """Under torchrun (WORLD_SIZE > 1): join the other processes, nccl on CUDA (GPU LOCAL_RANK each), gloo
    on the CPU; returns this process's rank (0 without torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0
    if batch % world:
        raise UsageError(f"--batch {batch} does not divide by the {world} processes of torchrun (each "
                         f"takes batch / {world} images of every micro-batch); use a multiple of {world}.")
    device = pick_device(device_name)
    if device.type == "cuda":
        if device.index is not None:
            raise UsageError(f"--device {device_name}: under torchrun each process uses the GPU of its "
                             f"LOCAL_RANK; pass --device cuda (or auto), and CUDA_VISIBLE_DEVICES to choose.")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank()


def all_stop(stop, device):
    """Whether any rank says stop (one small all-reduce per step: every rank gets the same answer); without
    torchrun, `stop` itself."""
    if not dist.is_initialized():
        return stop
    flag = torch.tensor(float(stop), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
