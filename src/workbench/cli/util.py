"""Small helpers shared by the ``workbench`` sub-commands."""

from __future__ import annotations

import sys

from workbench.policy import Policy, PolicyError, load_policy


def load_policy_or_report(path: str) -> Policy | None:
    """The policy at ``path``, or None after printing every problem to stderr."""
    try:
        return load_policy(path)
    except PolicyError as e:
        print(str(e), file=sys.stderr)
        return None


def split_groups(text: str) -> list[str]:
    """``"g1, g2,"`` -> ``["g1", "g2"]`` (pure)."""
    return [g.strip() for g in text.split(",") if g.strip()]
