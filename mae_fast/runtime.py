"""What train and bench both need from the machine: the device, seeding, TF32, the training stream."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch

from .config import ConfigError


def resolve_device(name: str, local_rank: int = 0, world_size: int = 1, key: str = "misc.device") -> torch.device:
    """misc.device (or the option `key`) -> the device of this process (under torchrun, the GPU of its LOCAL_RANK)."""
    if name.startswith("cuda:") and world_size > 1:
        raise ConfigError(
            f"{key}: {name!r} would put every rank on one GPU; under torchrun use 'auto' or "
            f"'cuda' (each rank takes the GPU of its LOCAL_RANK)"
        )
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cuda" and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{key}: {name!r} but no CUDA device is visible; use 'auto' or 'cpu'")
    return torch.device(name)


def setup_device(name: str, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """resolve_device, then make it current and allow TF32 matmuls (the fp32 parts of the step)."""
    device = resolve_device(name, local_rank, world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def train_stream(device: torch.device, high_priority: bool) -> Iterator[None]:
    """misc.high_priority_stream: run the training on a high-priority CUDA stream, so that when DALI's
    decode and resize kernels (on DALI's own stream) compete with the step for the SMs, the step's
    kernels are scheduled first and DALI's fill the gaps. A no-op on the CPU or when off."""
    if device.type != "cuda" or not high_priority:
        yield
        return
    stream = torch.cuda.Stream(device, priority=-1)  # lower is higher; -1 is high on every CUDA GPU
    stream.wait_stream(torch.cuda.current_stream(device))
    try:
        with torch.cuda.stream(stream):
            yield
    finally:
        torch.cuda.current_stream(device).wait_stream(stream)
