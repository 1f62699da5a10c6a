"""Memory budgets: a size ("2GiB", "512MB", "1.5G") or a Jetson preset.

A preset's budget is the module's memory minus headroom for everything that is not
fieldlearn: the OS (L4T, headless), the camera and inference process a field device runs
beside training, and the page cache the system needs to stay responsive. CPU and GPU
share the module's DRAM on every Jetson, so the budget covers both: the learner's host
memory, its CUDA allocations and the CUDA context.

| preset        | memory | headroom | budget  |
|---------------|--------|----------|---------|
| orin-nano-4gb | 4 GiB  | 1.25 GiB | 2.75 GiB |
| orin-nano-8gb | 8 GiB  | 2 GiB    | 6 GiB   |
| orin-nx-8gb   | 8 GiB  | 2 GiB    | 6 GiB   |
| orin-nx-16gb  | 16 GiB | 3 GiB    | 13 GiB  |
| agx-orin-32gb | 32 GiB | 4 GiB    | 28 GiB  |
| agx-orin-64gb | 64 GiB | 6 GiB    | 58 GiB  |

The headroom figures are assumptions, not measurements on those modules: a headless
JetPack 6 boot uses roughly 0.6-1 GiB, a desktop session 1.5-2 GiB, and an inference
app a few hundred MiB more. Measure your own device (`free -b` with everything else
running) and pass the difference as a SIZE when it differs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fieldlearn.runtime.errors import UserError

GiB = 1 << 30
MiB = 1 << 20


@dataclass(frozen=True)
class Budget:
    bytes: int
    label: str               # what the user asked for
    total: int | None = None      # module memory (presets)
    headroom: int | None = None   # left for the OS and other apps (presets)

    def describe(self) -> str:
        if self.total is None:
            return f"{self.label} ({fmt_bytes(self.bytes)})"
        return (f"{self.label}: {fmt_bytes(self.total)} - {fmt_bytes(self.headroom)} headroom "
                f"= {fmt_bytes(self.bytes)}")


# name -> (module memory, headroom)
PRESETS: dict[str, tuple[int, int]] = {
    "orin-nano-4gb": (4 * GiB, int(1.25 * GiB)),
    "orin-nano-8gb": (8 * GiB, 2 * GiB),
    "orin-nx-8gb": (8 * GiB, 2 * GiB),
    "orin-nx-16gb": (16 * GiB, 3 * GiB),
    "agx-orin-32gb": (32 * GiB, 4 * GiB),
    "agx-orin-64gb": (64 * GiB, 6 * GiB),
}

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": MiB, "g": GiB, "t": 1 << 40,
          "kib": 1 << 10, "mib": MiB, "gib": GiB, "tib": 1 << 40,
          "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12}


def parse_size(text: str) -> int:
    """'2GiB', '2G' (binary), '512MB' (decimal), '1.5gib', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise UserError(f"--budget {text}: not a size (e.g. 2GiB, 512MB, 1.5G) or a preset "
                        f"({', '.join(PRESETS)})")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise UserError(f"--budget {text}: must be more than zero")
    return value


def parse_budget(text: str) -> Budget:
    key = text.strip().lower()
    if key in PRESETS:
        total, headroom = PRESETS[key]
        return Budget(total - headroom, key, total, headroom)
    return Budget(parse_size(text), text.strip())


def fmt_bytes(n: float) -> str:
    sign = "-" if n < 0 else ""
    n = abs(n)
    if n >= GiB:
        return f"{sign}{n / GiB:.2f} GiB"
    if n >= MiB:
        return f"{sign}{n / MiB:.1f} MiB"
    return f"{sign}{n / 1024:.0f} KiB"
