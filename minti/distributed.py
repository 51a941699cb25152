"""Data parallelism for the training loop (torchrun; train.py's --help says how the batch is split).

Every rank draws the WHOLE step's batch from the same seeded generator (so the draws are a 1-process
run's), keeps its slice, and the gradient (the loss, the sampler's readings) is averaged (gathered)
over the ranks: N processes take the step one process would, and the vectors, AdamW's state and the
generator stay identical on every rank. With one process every function here is a no-op.
"""
import os
import signal
import threading

import torch
import torch.distributed as dist

from .cli import STOP_SIGNALS, UsageError
from .files import pick_device

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


def rank_and_world():
    """(this process's rank, the number of processes): (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def my_slice(batches):
    """This rank's contiguous slice of every micro-batch (the batch must divide by the world size)."""
    rank, world = rank_and_world()
    if world == 1:
        return batches
    if len(batches[0][0]) % world:
        raise ValueError(f"a batch of {len(batches[0][0])} does not split over {world} processes.")
    return [tuple(x.chunk(world)[rank] for x in batch) for batch in batches]


def average_over_ranks(tensor):
    """The mean of `tensor` over the ranks, in place (sum, then divide)."""
    _, world = rank_and_world()
    if world > 1:
        dist.all_reduce(tensor)
        tensor.div_(world)
    return tensor


def gather_over_ranks(tensor):
    """[B/N, ...] on each rank -> [B, ...], in rank order (= the order of the whole batch)."""
    _, world = rank_and_world()
    if world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)
