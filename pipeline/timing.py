"""Where a window's time and memory go: seconds per stage, each DiT step, and the device's peak memory.

Each stage ends at a device synchronisation, so the GPU work a stage queued is charged to that stage and
not to whichever later call happens to wait for it. A window has a few dozen such points; next to a DiT
forward of seconds, the launch bubble each one leaves is nothing.
"""

import time
from contextlib import contextmanager
from collections.abc import Iterator

import torch


class StageClock:
    """One window's stages, in the order first timed: `seconds[name]` sums every stage of that name,
    `steps` lists each sampling step on its own."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.seconds: dict[str, float] = {}
        self.steps: list[float] = []
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as `name`; a "dit" stage is one sampling step, and is listed in `steps` too."""
        started = time.perf_counter()
        yield
        self._synchronize()
        elapsed = time.perf_counter() - started
        self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
        if name == "dit":
            self.steps.append(elapsed)

    def peak_memory(self) -> dict[str, int]:
        """Bytes the device's caching allocator gave out (allocated) and held (reserved) at most since the
        clock started; empty off CUDA, where torch does not count."""
        if self.device.type != "cuda":
            return {}
        return {
            "peak_allocated": torch.cuda.max_memory_allocated(self.device),
            "peak_reserved": torch.cuda.max_memory_reserved(self.device),
        }

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
