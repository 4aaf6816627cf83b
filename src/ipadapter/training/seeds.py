"""Every random choice of a run, seeded, so a resumed run repeats exactly what the whole run would have done.

A step's choices (which example is dropped, the noise, the timesteps, the latent sample) come from
:func:`step_generator` seeded by (seed, step, micro-batch, rank); the data order from :func:`epoch_order`
seeded by (seed, epoch); an example's crop and flip from (seed, epoch, index). :func:`deterministic_kernels`
makes the GPU's arithmetic repeat too.
"""

from __future__ import annotations

import hashlib
import os

import torch


def deterministic_kernels(
    on: bool, warn_only: bool = False, benchmark: bool = False
) -> tuple[bool, bool, bool]:
    """Switch torch to deterministic kernels (or back); returns the previous (on, warn_only, cudnn benchmark).

    On CUDA the same run then gives the same weights bit for bit (at some speed: cuDNN's autotuner is off and
    attention's backward takes its slower ordered path); an op with no deterministic kernel raises. cuBLAS
    needs ``CUBLAS_WORKSPACE_CONFIG`` set before its first call, so this sets it when it is unset.
    """
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
    )
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=warn_only)
    torch.backends.cudnn.benchmark = benchmark
    return before


def step_generator(seed: int, *parts: int) -> torch.Generator:
    """A CPU generator for one (step, micro-batch, rank): the same numbers whenever that step runs."""
    value = seed
    for part in parts:
        value = (value * 1_000_003 + part + 1) % (2**63 - 1)
    return torch.Generator("cpu").manual_seed(value)


def example_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for (seed, epoch, index)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def example_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU generator for example ``index`` of ``epoch`` (its crop and flip); index -1 orders the epoch."""
    return torch.Generator().manual_seed(example_seed(seed, epoch, index))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A deterministic permutation of ``range(n)`` for one epoch."""
    return torch.randperm(n, generator=example_generator(seed, epoch, -1)).tolist()


def training_noise(shape: torch.Size, offset: float, generator: torch.Generator) -> torch.Tensor:
    """A training step's noise, drawn on the CPU from ``generator``; ``offset`` > 0 adds offset noise.

    Offset noise is one constant per example and channel (std ``offset``) on top of the Gaussian: it hides a
    latent's mean (a plain background's colour) at the high noise levels, so the denoiser takes it from its
    conditioning rather than from the starting noise.
    """
    noise = torch.randn(shape, generator=generator)
    if offset:
        noise = noise + offset * torch.randn(*shape[:2], 1, 1, generator=generator)
    return noise
