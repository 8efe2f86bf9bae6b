"""Where training runs and how it stays reproducible: CUDA when there is one (bf16 autocast where
a stage asks for it), the CPU otherwise, with deterministic kernels on the CPU."""

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def device_for_training() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA; a no-op on the CPU, whose bf16 kernels are slower than float32's."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


@contextmanager
def deterministic_on_cpu(device: torch.device) -> Iterator[None]:
    """torch's deterministic kernels while training on the CPU, so one seed gives one model: some
    CPU backward passes (embedding gradients) otherwise add in thread order. CUDA keeps its fast
    kernels. torch would also fill every new tensor's memory with NaN in this mode, a debugging
    aid that doubled the CTR step's time: no kernel used here reads memory it did not write."""
    if device.type != "cpu":
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.utils.deterministic.fill_uninitialized_memory = previous[1]
