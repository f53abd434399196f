"""Process-group set-up for torchrun, rank helpers, metric reduction and the resumable per-rank sampler."""
from __future__ import annotations

import os
import random
from datetime import timedelta
from typing import Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler


def is_distributed() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0: the only process that writes files and logs."""
    return get_rank() == 0


def init_distributed(device: str) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (RANK / WORLD_SIZE / LOCAL_RANK in the environment).

    NCCL on CUDA, gloo on CPU. Without torchrun's variables nothing is initialised (one process).
    Returns (rank, world_size, the torch device of this process: cuda:LOCAL_RANK or cpu).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError(f"DEVICE is {device!r} but CUDA is not available; set DEVICE cpu")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not is_distributed():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30),
                                device_id=dev if use_cuda else None)
    return get_rank(), get_world_size(), dev


def cleanup_distributed() -> None:
    """Leave the process group (no-op without one)."""
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if is_distributed():
        dist.barrier()


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch with ``seed`` (the official code passes SEED + rank).

    ``deterministic`` also asks torch for deterministic kernels (what exact-resume tests need); on CUDA this
    needs CUBLAS_WORKSPACE_CONFIG, set here when absent.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def reduce_mean(values: Mapping[str, float | torch.Tensor], device: torch.device) -> dict[str, float]:
    """Average scalar metrics over ranks (every rank gets the result). values: name -> scalar."""
    names = sorted(values)
    if not names:
        return {}
    t = torch.tensor([float(values[k]) for k in names], dtype=torch.float64, device=device)
    if is_distributed():
        dist.all_reduce(t)
        t /= get_world_size()
    return dict(zip(names, t.tolist()))


def all_true(flag: bool, device: torch.device) -> bool:
    """True only when ``flag`` holds on every rank (e.g. every rank's loss is finite)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)


class ShardedEpochSampler(Sampler[int]):
    """Epoch-seeded shuffled indices split across ranks, which can start part-way through an epoch.

    The order of epoch ``e`` is a permutation drawn from ``seed + e`` (independent of the global RNG, so a
    resumed run sees the same order); it is padded by wrapping to a multiple of ``world_size`` and rank
    ``r`` takes positions r, r+W, r+2W, ... (the ``DistributedSampler`` split). ``set_position(e, k)``
    skips this rank's first ``k`` samples of epoch ``e`` (k = batches done × batch size on resume).
    ``max_samples`` > 0 caps each rank's epoch (short smoke runs).
    """

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0,
                 max_samples: int = 0):
        if num_samples < 1:
            raise ValueError("ShardedEpochSampler: the dataset is empty")
        self.n, self.rank, self.world, self.shuffle, self.seed = num_samples, rank, world_size, shuffle, seed
        self.max_samples = int(max_samples)
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        """Select epoch ``epoch`` and skip this rank's first ``start`` samples of it."""
        self.epoch, self.start = int(epoch), int(start)

    def epoch_indices(self) -> list[int]:
        """This rank's whole index list for the current epoch (before skipping)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = -(-self.n // self.world) * self.world
        order = (order * (total // self.n + 1))[:total]
        mine = order[self.rank::self.world]
        return mine[:self.max_samples] if self.max_samples > 0 else mine

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self.start:])

    def __len__(self) -> int:
        full = -(-self.n // self.world)
        return max((min(full, self.max_samples) if self.max_samples > 0 else full) - self.start, 0)


class EpochSeededDataset(torch.utils.data.Dataset):
    """Wraps a training dataset so that sample ``i`` of epoch ``e`` is augmented with RNGs seeded from
    (seed, e, i), whatever rank, worker or resume point reads it; the caller's RNG states are restored.

    This is what makes 1- and 2-process runs see the same augmented samples and a resumed run continue
    bit-for-bit, with any number of loader workers.
    """

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation seeds are used (before creating the loader iterator)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int):
        sample_seed = (self.seed * 1_000_003 + self.epoch * 10_007 + int(idx)) % 2**31
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            random.seed(sample_seed)
            np.random.seed(sample_seed)
            try:
                return self.dataset[idx]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)

    def __getattr__(self, name):
        # Readers of the wrapped dataset (index, num_frames, ...) keep working on the wrapper.
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)
