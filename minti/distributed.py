"""Data parallelism for the training loop (torchrun; train.py's --help says how the batch is split).

Every rank draws the WHOLE step's batch from the same seeded generator (so the draws are a 1-process
run's), keeps its slice, and the gradient (the loss, the sampler's readings) is averaged (gathered)
over the ranks: N processes take the step one process would, and the vectors, AdamW's state and the
generator stay identical on every rank. With one process every function here is a no-op.
"""
import torch
import torch.distributed as dist


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
