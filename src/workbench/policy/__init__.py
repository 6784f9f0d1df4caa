"""The platform policy: one validated, immutable model of the platform YAML.

Every component (hub, gateway, quota service, chart) asks this model instead of
re-reading YAML. ``load_policy(path)`` is the only I/O here; everything else is
pure. Errors are collected and reported together, each naming the file, the
path of the field (``groups.physics-lab.profiles[1]``) and what is expected.

The model is split by concern: :mod:`.base` (error type, quantities), :mod:`.auth`, :mod:`.model` (the sections
and :class:`Policy`), :mod:`.checks` (loading and the checks across sections); import from here.
"""

from workbench.policy.base import PolicyError, parse_duration, parse_quantity
from workbench.policy.checks import cached_policy, load_policy, parse_policy
from workbench.policy.model import (
    Budget,
    Caps,
    Culling,
    DaskPolicy,
    GpuType,
    Group,
    Material,
    Policy,
    Profile,
    Session,
    Storage,
)

__all__ = [
    "Budget",
    "Caps",
    "Culling",
    "DaskPolicy",
    "GpuType",
    "Group",
    "Material",
    "Policy",
    "PolicyError",
    "Profile",
    "Session",
    "Storage",
    "cached_policy",
    "load_policy",
    "parse_duration",
    "parse_policy",
    "parse_quantity",
]
