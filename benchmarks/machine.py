"""What a benchmark report records about the machine and the package versions it ran on."""

from __future__ import annotations

import importlib.metadata
import platform
from pathlib import Path


def package_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_peak_flops(size: int = 2048, runs: int = 10) -> dict[str, float]:
    """The machine's measured float32 matmul rate (FLOP/s), the denominator of MFU: the best
    of `runs` timed [size, size] x [size, size] products, through JAX (XLA's CPU dot) and
    through torch (its BLAS), each after a warm-up call. `peak` is the higher of the two."""
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    flops = 2.0 * size**3

    def best(call) -> float:
        call()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return flops / min(times)

    matmul = jax.jit(jnp.matmul)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    rates = {"jax": best(lambda: matmul(ja, jb).block_until_ready()),
             "torch": best(lambda: torch.mm(ta, tb))}
    return {**rates, "peak": max(rates.values()), "size": size}
