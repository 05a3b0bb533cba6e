"""How the C allocator (glibc's malloc, on Linux) holds the memory of torch's CPU tensors.

Two settings matter for SAM3 on a CPU, and they pull in opposite directions:
- large tensors come and go every layer, and glibc gives each block over 32 MB a fresh mmap,
  unmapped again on free: the next one page-faults all its pages back in, zeroed by the kernel;
- weights are converted once (cast to bf16, quantized to int8), and what that frees stays
  resident in the heap unless handed back.
Elsewhere (macOS, musl) both functions do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_MAX = -4
_KEEP_HEAP_BYTES = 128 << 20
OPT_OUT = "SAM3STUDIO_DEFAULT_MALLOC"


def reuse_freed_memory() -> None:
    """Serve large tensors from the heap and keep up to 128 MB of freed heap top for the next ones.

    At full size the ViT makes several 49 MB tensors per layer. On the 2-core VMs here a bf16
    GELU over one took 26 ms into a fresh block and 6.5 ms into a reused one; an add 22 -> 3 ms.
    The cost is memory that stays resident between calls instead of going back to the OS.
    Process-wide, so set once, when a Segmenter is made; `SAM3STUDIO_DEFAULT_MALLOC=1` in the
    environment leaves malloc as it was."""
    libc = _libc()
    if libc is None or os.environ.get(OPT_OUT):
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_HEAP_BYTES)


def release_freed_memory() -> None:
    """Give memory freed by converting weights back to the OS. After rewriting ~840 M weights
    that is gigabytes the heap would keep: full-size SAM3 quantized to int8 held 3.8 GB
    resident, 2.1 GB after this."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    # glibc only: musl and macOS have neither malloc_trim nor these mallopt parameters.
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
