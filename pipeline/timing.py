"""Where a window's time and memory go: seconds per stage, each DiT step, and the device's peak memory.

Each stage ends at a device synchronisation, so the GPU work a stage queued is charged to that stage and
not to whichever later call happens to wait for it. A window has a few dozen such points; next to a DiT
forward of seconds, the launch bubble each one leaves is nothing.
"""

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


class StageClock:
    """One window's stages, in the order first timed: `seconds[name]` sums every stage of that name,
    `steps` lists each sampling step on its own. `on_stage(name, count)`, if given, is called as each stage
    begins, `count` being how many stages of that name have begun so far (the step number, for "dit")."""

    def __init__(self, device: torch.device, on_stage: Callable[[str, int], None] | None = None):
        self.device = torch.device(device)
        self.on_stage = on_stage
        self.seconds: dict[str, float] = {}
        self.steps: list[float] = []
        self._begun: dict[str, int] = {}
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as `name`; a "dit" stage is one sampling step, and is listed in `steps` too."""
        self._begun[name] = self._begun.get(name, 0) + 1
        if self.on_stage is not None:
            self.on_stage(name, self._begun[name])
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
