"""Notebook servers as Slurm jobs, the pure parts: where a server runs, its sbatch options, and Slurm's view of a job.

:func:`server_job` turns (policy, user's groups, profile) into a :class:`ServerJob`: the group charged
(the user's first group entitled to the profile, as the quota service charges it), partition,
account, QoS and node features (the profile's ``slurm:`` over its group's), ``--time`` (the
server's session limit, so the job's time limit and the session end agree), ``--cpus-per-task``,
``--mem`` and ``--gres=gpu:<type>:<n>``. :func:`placement_table` is what ``workbench check``
prints. :func:`parse_scontrol` and :class:`JobInfo` read ``scontrol show job -o``.

Used by :mod:`workbench.spawn.slurm` (the spawner) and the command; nothing here runs Slurm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime

from workbench.gateway.slurm import slurm_time
from workbench.policy import Policy
from workbench.services.quota.views import charge_group
from workbench.services.sessions.rules import server_limits

__all__ = [
    "PENDING_STATES",
    "RUNNING_STATES",
    "JobInfo",
    "ServerJob",
    "describe_reason",
    "parse_scontrol",
    "placement_table",
    "server_job",
]

#: job states in which the job waits to run
PENDING_STATES = frozenset({"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING"})
#: the job runs (SUSPENDED: it holds its allocation)
RUNNING_STATES = frozenset({"RUNNING", "SUSPENDED"})

#: Slurm's reasons for a pending job, in words (the reason itself is always shown too)
_REASONS = {
    "Priority": "other jobs come first",
    "Resources": "waiting for free cores, memory or GPUs",
    "PartitionDown": "the partition is down",
    "PartitionInactive": "the partition is inactive",
    "PartitionTimeLimit": "the session is longer than the partition allows",
    "PartitionNodeLimit": "the partition has too few nodes",
    "ReqNodeNotAvail": "the nodes it needs are not available",
    "QOSMaxJobsPerUserLimit": "your QoS allows no more jobs now",
    "AssocGrpGRES": "your account's GPU limit is reached",
    "BeginTime": "not before its begin time",
    "Dependency": "waiting for another job",
    "JobHeldAdmin": "held by an administrator",
    "JobHeldUser": "held",
    "NodeDown": "a node it needs is down",
}


def describe_reason(reason: str) -> str:
    """``Resources (waiting for free cores, memory or GPUs)`` (pure)."""
    words = _REASONS.get(reason)
    return f"{reason} ({words})" if words else reason


@dataclass(frozen=True)
class ServerJob:
    """One server's Slurm job: who pays and where it runs."""

    profile: str
    group: str | None
    cpus: int
    memory_mib: int
    time_limit: int | None = None  # seconds (the session limit); None: the partition's limit
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    gres: str | None = None  # gpu:<type>:<n>

    def sbatch_args(self) -> list[str]:
        """The sbatch options of the job, in a fixed order (pure)."""
        args = [f"--cpus-per-task={self.cpus}", f"--mem={self.memory_mib}M"]
        for opt, value in (
            ("partition", self.partition),
            ("account", self.account),
            ("qos", self.qos),
            ("constraint", self.constraint),
            ("gres", self.gres),
        ):
            if value:
                args.append(f"--{opt}={value}")
        if self.time_limit:
            args.append(f"--time={slurm_time(self.time_limit)}")
        return args


def server_job(policy: Policy, user_groups: list[str], profile: str) -> ServerJob:
    """Where a server of ``profile`` started by a member of ``user_groups`` runs (pure).

    The group is the one charged for it (its first group entitled to the profile). Partition, account, QoS and
    constraint: the profile's ``slurm:`` value if set, else the group's. GPUs: ``gpu:<gres_type>:<count>``, the
    GRES type being the profile's ``slurm.gres_type``, else its GPU type's name.
    """
    prof = policy.profiles[profile]
    group = charge_group(policy, user_groups, profile)
    gslurm = policy.groups[group].slurm if group else None
    pslurm = prof.slurm

    def pick(name: str) -> str | None:
        value = getattr(pslurm, name, None) if pslurm else None
        if value is None and gslurm is not None:
            value = getattr(gslurm, name)
        return value

    gres = None
    if prof.gpu:
        gtype = (pslurm.gres_type if pslurm else None) or prof.gpu.type
        gres = f"gpu:{gtype}:{prof.gpu.count}"
    return ServerJob(
        profile=profile,
        group=group,
        cpus=max(1, math.ceil(prof.cpu)),
        memory_mib=max(1, math.ceil((prof.memory_limit or prof.memory) / 2**20)),
        time_limit=server_limits(policy, [group] if group else user_groups, profile).max_age,
        partition=pick("partition"),
        account=pick("account"),
        qos=pick("qos"),
        constraint=pick("constraint"),
        gres=gres,
    )


def placement_table(policy: Policy) -> str:
    """Where each group's servers would run as Slurm jobs: one row per group and profile (pure)."""
    rows = [("group", "profile", "sbatch options")]
    for gname, group in policy.groups.items():
        for pname in group.profiles:
            if pname in policy.profiles:
                rows.append((gname, pname, " ".join(server_job(policy, [gname], pname).sbatch_args())))
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    lines = [f"{r[0].ljust(widths[0])}  {r[1].ljust(widths[1])}  {r[2]}".rstrip() for r in rows]
    lines.insert(1, f"{'-' * widths[0]}  {'-' * widths[1]}  {'-' * 14}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Slurm's view of a job
# ---------------------------------------------------------------------------


def _slurm_datetime(value: str | None) -> datetime | None:
    """``2026-05-04T17:55:00`` (Slurm prints local time) as an aware UTC datetime; None for ``Unknown``/``None``."""
    if not value or value in ("Unknown", "None", "(null)"):
        return None
    try:
        return datetime.fromisoformat(value).astimezone().astimezone(UTC)
    except ValueError:
        return None


def _slurm_duration(value: str | None) -> int:
    """``[D-]HH:MM:SS`` as seconds (0 when unknown)."""
    if not value or value in ("UNLIMITED", "Partition_Limit", "INVALID"):
        return 0
    days = 0
    if "-" in value:
        d, value = value.split("-", 1)
        days = int(d)
    parts = [int(p) for p in value.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    h, m, s = parts
    return days * 86400 + h * 3600 + m * 60 + s


@dataclass(frozen=True)
class JobInfo:
    """One job as ``scontrol show job -o`` shows it."""

    job_id: str
    state: str
    reason: str = ""
    host: str = ""
    start: datetime | None = None
    end: datetime | None = None
    run_seconds: int = 0
    fields: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def pending(self) -> bool:
        return self.state in PENDING_STATES

    @property
    def running(self) -> bool:
        return self.state in RUNNING_STATES

    @property
    def ended(self) -> bool:
        return not (self.pending or self.running)

    @property
    def ran(self) -> bool:
        """Whether the job ever ran (a job cancelled while pending did not)."""
        return self.run_seconds > 0 or self.running

    def describe(self) -> str:
        """``Slurm job 42: PENDING, reason: Resources (...)``: what the spawn page shows."""
        text = f"Slurm job {self.job_id}: {self.state}"
        if self.reason and self.reason != "None":
            text += f", reason: {describe_reason(self.reason)}"
        if self.running and self.host:
            text += f" on {self.host}"
        return text


def parse_scontrol(output: str) -> JobInfo | None:
    """The job in ``scontrol show job -o <id>`` output; None when Slurm no longer knows it (pure)."""
    line = output.strip().splitlines()[0] if output.strip() else ""
    if not line.startswith("JobId="):
        return None
    fields = {}
    for item in line.split():
        if "=" in item:
            k, v = item.split("=", 1)
            fields.setdefault(k, v)
    return JobInfo(
        job_id=fields.get("JobId", ""),
        state=fields.get("JobState", "UNKNOWN"),
        reason=fields.get("Reason", ""),
        host=fields.get("BatchHost", ""),
        start=_slurm_datetime(fields.get("StartTime")),
        end=_slurm_datetime(fields.get("EndTime")),
        run_seconds=_slurm_duration(fields.get("RunTime")),
        fields=fields,
    )
