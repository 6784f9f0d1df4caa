"""Building blocks of the policy model: :class:`PolicyError` (path + fix per problem), quantities, durations,
cores and names as pydantic types, the frozen base model (pure).
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


class PolicyError(ValueError):
    """A platform YAML that cannot be used. ``problems`` is a list of (path, message)."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        lines = [f"{source}: invalid platform policy ({len(problems)} problem{'s' if len(problems) != 1 else ''})"]
        for path, msg in problems:
            lines.append(f"  - {path or '<top level>'}: {msg}")
        super().__init__("\n".join(lines))


# ---------------------------------------------------------------------------
# Quantities
# ---------------------------------------------------------------------------

_QUANTITY_RE = re.compile(r"^(?P<num>[0-9]+(?:\.[0-9]+)?)(?P<unit>|k|K|M|G|T|Ki|Mi|Gi|Ti)$")
_UNITS = {
    "": 1,
    "k": 10**3,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def parse_quantity(value: Any) -> int:
    """Parse a Kubernetes-style memory quantity (``8G``, ``512Mi``, ``1073741824``) into bytes."""
    if isinstance(value, bool):
        raise ValueError(f"expected a memory size like 8G or 512Mi, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"must not be negative, got {value!r}")
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a memory size like 8G or 512Mi, got {value!r}")
    m = _QUANTITY_RE.match(value.strip())
    if not m:
        raise ValueError(
            f"expected a memory size like 8G, 512Mi or 1.5Gi (number then unit, no space; "
            f"units k, M, G, T, Ki, Mi, Gi, Ti), got {value!r}"
        )
    return int(Decimal(m["num"]) * _UNITS[m["unit"]])


_DURATION_RE = re.compile(r"^(?P<num>[0-9]+(?:\.[0-9]+)?)(?P<unit>s|m|h|d)?$")
_DURATION_UNITS = {None: 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: Any) -> int:
    """Parse a duration (``90``, ``30s``, ``15m``, ``8h``, ``2d``) into whole seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 30m or 8h, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"must not be negative, got {value!r}")
        return int(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value.strip())
        if m:
            return int(Decimal(m["num"]) * _DURATION_UNITS[m["unit"]])
    raise ValueError(f"expected a duration like 90, 30s, 15m, 8h or 2d, got {value!r}")


def _positive_cpu(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        if isinstance(value, str):
            try:
                value = float(value[:-1]) / 1000 if value.endswith("m") else float(value)
            except ValueError:
                raise ValueError(f"expected a number of cores like 2 or 0.5 or 500m, got {value!r}") from None
        else:
            raise ValueError(f"expected a number of cores like 2 or 0.5, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number of cores like 2 or 0.5, got {value!r}")
    if value <= 0:
        raise ValueError(f"must be more than 0 cores, got {value!r}")
    return float(value)


Memory = Annotated[int, BeforeValidator(parse_quantity)]
Duration = Annotated[int, BeforeValidator(parse_duration)]
Cores = Annotated[float, BeforeValidator(_positive_cpu)]
Name = Annotated[str, Field(pattern=r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$", max_length=63)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _names(d: dict) -> str:
    return ", ".join(sorted(d)) or "(none defined)"
