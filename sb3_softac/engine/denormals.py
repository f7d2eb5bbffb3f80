"""Subnormal floats flushed to zero while the engine steps (XLA, and so SBX, flush them by default)."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager

import torch as th

#: The smallest positive subnormal double, made from its bits rather than parsed (parsing may itself flush it).
_SUBNORMAL = struct.unpack("<d", struct.pack("<Q", 1))[0]


def _flushing_denormals() -> bool:
    """Whether this thread flushes subnormal floats to zero.

    ``torch.set_flush_denormal`` sets the thread's floating-point control register, which Python's own float
    arithmetic obeys too: a subnormal times one then comes out zero. PyTorch has no getter, and a probe on a tensor
    would read a value back to the host.
    """
    return _SUBNORMAL * 1.0 == 0.0


@contextmanager
def denormals_flushed() -> Iterator[None]:
    """Run the block with subnormal floats flushed to zero in this thread, then put the thread's mode back.

    Adam's first moment of a weight whose gradient is zero (a dead ReLU unit) decays by ``beta1`` at each step and
    spends about 150 steps below float32's smallest normal number (1.2e-38) before it reaches zero. CPUs handle
    such subnormal numbers in microcode, much slower than normal ones (the CHANGELOG has the measurement). XLA, and
    so SBX, flush them by default. Flushing changes only values below 1.2e-38, which then read as zero.
    ``torch.set_flush_denormal`` sets the calling thread's mode; with more than one torch thread the intra-op
    worker threads keep theirs.
    """
    was_flushing = _flushing_denormals()
    if not was_flushing:
        th.set_flush_denormal(True)
    try:
        yield
    finally:
        if not was_flushing:
            th.set_flush_denormal(False)
