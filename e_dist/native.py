"""The CPU kernels of ALTO's fast path, compiled on first use.

The C++ source in ``csrc/alto_cpu.cpp`` is built with torch's JIT extension
loader (ninja and a C++ compiler) into ``TORCH_EXTENSIONS_DIR``, once per
machine and source version; later imports load the cached library.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "alto_cpu.cpp"

# -ffp-contract=off: no fused multiply-adds, so the kernels round as torch's
# eager ops do. -fno-math-errno lets sqrt vectorise; it changes no result.
_BASE_FLAGS = ("-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno")


def _vector_isa() -> str | None:
    """The widest vector extension this CPU has that the build may use.

    The name goes into the extension's name, so a cache directory shared by
    different machines never hands one the other's binary.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return None
    if "avx512f" in flags:
        return "avx512f"
    return "avx2" if "avx2" in flags else None


@functools.cache
def cpu_kernels() -> ModuleType | None:
    """Return the compiled kernel module, or None where it cannot be built.

    The first failure is logged once as a warning with its cause; the caller
    then takes the reference path.
    """
    if os.environ.get("E_DIST_NO_NATIVE"):
        return None
    try:
        from torch.utils import cpp_extension

        isa = _vector_isa()
        return cpp_extension.load(
            name="e_dist_alto_cpu" + (f"_{isa}" if isa else ""),
            sources=[str(_SOURCE)],
            extra_cflags=[*_BASE_FLAGS, *([f"-m{isa}"] if isa else [])],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as error:
        logger.warning(
            "e_dist: the CPU kernels could not be built (%s: %s); ALTO takes the "
            "slower reference path. Install ninja and a C++ compiler to fix this.",
            type(error).__name__,
            error,
        )
        return None
