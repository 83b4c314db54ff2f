"""Shared GPU timing for the kernel benchmarks (`pytest benchmarks/ --benchmark-only`); CUDA only.

Timings are CUDA-event medians with L2 flushed before every repetition, so bandwidth figures are for cold reads,
as when the UNet's feature maps no longer sit in cache. A results table is printed at the end of the run.
"""
from __future__ import annotations

import statistics
from collections.abc import Callable

import pytest
import torch

L2_FLUSH_BYTES = 256 * 2**20  # larger than any current GPU's L2 (H100: 50 MiB)
ROWS = pytest.StashKey[list]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[ROWS] = []


@pytest.fixture(scope="session")
def cuda_ms() -> Callable[..., float]:
    """cuda_ms(fn) -> median milliseconds of fn() on the GPU, L2 flushed before each repetition."""
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")

    def median_ms(fn: Callable[[], object], warmup: int = 5, reps: int = 50) -> float:
        for _ in range(warmup):
            fn()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(start.elapsed_time(end) for start, end in events)

    return median_ms


@pytest.fixture(scope="session")
def copy_gbps(cuda_ms) -> Callable[[int], float]:
    """copy_gbps(nbytes) -> device-to-device copy bandwidth in GB/s for that many bytes, counting read + write."""
    measured: dict[int, float] = {}

    def bandwidth(nbytes: int) -> float:
        if nbytes not in measured:
            src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
            dst = torch.empty_like(src)
            measured[nbytes] = 2 * nbytes / cuda_ms(lambda: dst.copy_(src)) / 1e6
        return measured[nbytes]

    return bandwidth


@pytest.fixture
def report_row(request) -> Callable[[dict], None]:
    """Adds one row (a dict of column -> value) to the table printed after the run."""
    return request.config.stash[ROWS].append


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    rows = config.stash.get(ROWS, [])
    if not rows:
        return
    columns = list(rows[0])
    terminalreporter.section("kernel benchmarks (CUDA-event medians, cold L2)")
    terminalreporter.write_line(" | ".join(columns))
    for row in rows:
        terminalreporter.write_line(" | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c])
                                               for c in columns))
