"""Per-stage accounting: wall seconds, CPU seconds, device seconds, peak host and device memory."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


@dataclass
class StageCost:
    """What one stage cost.

    Attributes:
        wall_s: wall-clock seconds.
        cpu_s: process CPU seconds (all threads).
        device_s: seconds measured by CUDA events on a GPU; equal to wall_s on the CPU.
        peak_host_mb: peak resident memory of the process during the stage (Linux: VmHWM after a
            reset; elsewhere the process's lifetime peak).
        peak_device_mb: peak allocated CUDA memory during the stage (0 on the CPU).
    """

    wall_s: float = 0.0
    cpu_s: float = 0.0
    device_s: float = 0.0
    peak_host_mb: float = 0.0
    peak_device_mb: float = 0.0

    def to_dict(self) -> dict[str, float]:
        """Plain dict."""
        return asdict(self)


def _reset_host_peak() -> None:
    with contextlib.suppress(OSError):
        _CLEAR_REFS.write_text("5")


def _host_peak_mb() -> float:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@contextlib.contextmanager
def measure(device: torch.device) -> Iterator[StageCost]:
    """Measure the enclosed block; the yielded StageCost is filled in on exit."""
    cost = StageCost()
    cuda = device.type == "cuda" and torch.cuda.is_available()
    _reset_host_peak()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start_evt = torch.cuda.Event(enable_timing=True)
        end_evt = torch.cuda.Event(enable_timing=True)
        start_evt.record()
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        yield cost
    finally:
        if cuda:
            end_evt.record()
            torch.cuda.synchronize(device)
            cost.device_s = start_evt.elapsed_time(end_evt) / 1000.0
            cost.peak_device_mb = torch.cuda.max_memory_allocated(device) / 2**20
        cost.wall_s = time.perf_counter() - t0
        cost.cpu_s = time.process_time() - c0
        if not cuda:
            cost.device_s = cost.wall_s
        cost.peak_host_mb = _host_peak_mb()
