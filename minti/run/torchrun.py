"""Joining torchrun's processes (the method's side, slicing and averaging, is minti/distributed.py).

Under torchrun every process runs train.py; join_ranks makes them one group (nccl on CUDA, gloo on the
CPU), and turns a stop signal into a request that every rank honours after the same step (all_stop).
"""
import os
import signal
import threading

import torch
import torch.distributed as dist

from .cli import STOP_SIGNALS, UsageError
from .devices import pick_device

STOP_REQUESTED = threading.Event()  # a stop signal reached this rank; the ranks stop together after the step


def join_ranks(batch, device_name):
    """Under torchrun (WORLD_SIZE > 1): join the other processes, nccl on CUDA (GPU LOCAL_RANK each), gloo
    on the CPU, and make Ctrl-C a request to stop after the current step (all_stop); returns the rank."""
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
    for s in STOP_SIGNALS:  # Ctrl-C, SIGTERM, SIGHUP: every rank stops after the same step (all_stop)
        signal.signal(s, lambda signum, frame: STOP_REQUESTED.set())
    return dist.get_rank()


def all_stop(device):
    """torchrun: whether a stop signal reached any rank (one small all-reduce per step: every rank agrees)."""
    flag = torch.tensor(float(STOP_REQUESTED.is_set()), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


