"""The CPU as `/proc/cpuinfo` describes it (read once): its model name and its instruction-set flags.

Used where a choice depends on the CPU: bf16 where it runs natively (`engines.torch_engine`), the machine a compiled
graph was built for (`engines.fast_encoder.machine_key`), and the CPU every benchmark names (`commands.bench`)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

NATIVE_BF16 = frozenset({"avx512_bf16", "amx_bf16"})


@dataclass(frozen=True)
class CpuInfo:
    """`model`: the first `model name` (None where there is none, as on ARM); `flags`: the first `flags` line as
    written (x86), `features`: the first `Features` line (ARM); None where absent or unreadable."""

    model: str | None = None
    flags: str | None = None
    features: str | None = None

    @property
    def flag_set(self) -> frozenset[str]:
        """Every flag (x86) or feature (ARM) named."""
        return frozenset((self.flags or self.features or "").split())

    @property
    def native_bf16(self) -> bool:
        """AVX-512 BF16 or AMX: bf16 matmuls at full speed."""
        return bool(self.flag_set & NATIVE_BF16)


def precision_on_cpu(precision: str) -> str:
    """`auto` → `bf16` where this CPU runs it natively (`CpuInfo.native_bf16`), else `fp32`; a named precision as
    given (torch's engines resolve a GPU's themselves: `engines.torch_engine.resolve_precision`)."""
    if precision != "auto":
        return precision
    return "bf16" if cpu_info().native_bf16 else "fp32"


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """This machine's CPU (an empty `CpuInfo` where /proc/cpuinfo cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return CpuInfo()
    found: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "flags", "Features") and key not in found:
            found[key] = value.strip()
    return CpuInfo(found.get("model name"), found.get("flags"), found.get("Features"))
