"""What the quota service accepts: usage events, admission requests and running items.

These pydantic models validate the JSON bodies of the REST API (errors name the field path)
and are what :class:`workbench.services.quota.ledger.Ledger` takes from Python callers too; their JSON
schemas go into the OpenAPI document, so the document cannot drift from the validation.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from workbench.services.quota.accounting import as_utc

Kind = Literal["server", "dask-scheduler", "dask-worker", "job"]  # job: a notebook job (workbench.jobs)
Id = str  # documented constraints below: 1..255 characters

__all__ = [
    "Kind",
    "Resources",
    "UsageEvent",
    "EventBatch",
    "AdmitRequest",
    "AdmitBody",
    "RunningItem",
    "ReconcileBody",
    "validation_problems",
    "server_item_id",
]


def server_item_id(user: str, server_name: str = "") -> str:
    """The ledger item of a notebook server (``server:alice/`` for the default server)."""
    return f"server:{user}/{server_name}"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(_Body):
    """What one item holds while it runs. Omitted values come from ``profile`` (a policy profile)."""

    profile: str | None = Field(default=None, max_length=255, description="policy profile; fills cpu, memory and gpu")
    cpu: float | None = Field(default=None, ge=0, description="cores")
    memory: int | None = Field(default=None, ge=0, description="bytes")
    gpu_type: str | None = Field(default=None, max_length=63, description="a policy GPU type (h100, h100-mig-1g, ...)")
    gpu_count: int | None = Field(default=None, ge=0, le=1024)

    @model_validator(mode="after")
    def _gpu_type_with_count(self):
        if self.gpu_count and not self.gpu_type and self.profile is None:
            raise ValueError("gpu_count needs gpu_type (or a profile with a GPU)")
        return self


class UsageEvent(Resources):
    """A start or stop of one item, sent by the hub (servers) or the gateway (schedulers, workers).

    ``id`` is the sender's unique id of this event: sending it again is a no-op, so senders
    retry until they get an answer. ``time`` defaults to when the service receives it.
    """

    id: str = Field(min_length=1, max_length=255)
    type: Literal["start", "stop"]
    item: str = Field(
        min_length=1, max_length=255, description="what runs: server:<user>/<name>, dask-worker:<cluster>/<worker>, ..."
    )
    time: datetime | None = None
    kind: Kind | None = Field(default=None, description="required for start")
    user: str | None = Field(default=None, min_length=1, max_length=255, description="required for start")
    group: str | None = Field(
        default=None, min_length=1, max_length=255, description="the group charged; required for start"
    )

    @model_validator(mode="after")
    def _start_fields(self):
        if self.type == "start":
            missing = [f for f in ("kind", "user", "group") if getattr(self, f) is None]
            if missing:
                raise ValueError(f"a start event needs {', '.join(missing)}")
        if self.time is not None and self.time.tzinfo is None:
            raise ValueError("time must include a timezone (e.g. 2026-11-30T23:00:00Z)")
        return self

    @property
    def at(self) -> datetime | None:
        return as_utc(self.time) if self.time else None


class EventBatch(_Body):
    events: list[UsageEvent] = Field(min_length=1, max_length=10000)


class AdmitRequest(Resources):
    """What a start asks for, before it starts: checked against budgets and caps, recorded if allowed."""

    item: str = Field(min_length=1, max_length=255)
    kind: Kind = "server"
    id: str | None = Field(
        default=None,
        min_length=1,
        max_length=255,
        description="idempotency key: an admission replayed with the same id returns the first answer",
    )
    needs_gpu_budget: bool = Field(
        default=False,
        description="refuse when the GPU budget is spent even if this item holds no GPU itself (the scheduler of a "
        "Dask cluster whose workers will have GPUs)",
    )


class AdmitBody(AdmitRequest):
    user: str = Field(min_length=1, max_length=255)
    group: str = Field(min_length=1, max_length=255)


class RunningItem(Resources):
    """Something the sender sees running now (for reconcile)."""

    item: str = Field(min_length=1, max_length=255)
    kind: Kind
    user: str = Field(min_length=1, max_length=255)
    group: str = Field(min_length=1, max_length=255)
    started: datetime | None = Field(default=None, description="when it started, if the sender knows")
    confirmed: bool = Field(
        default=True,
        description="false: the sender lists it (its records say running) but has not seen it alive since the "
        "sender restarted; its open row stays open without being marked seen, and no row is opened for it",
    )

    @property
    def started_at(self) -> datetime | None:
        return as_utc(self.started) if self.started else None


class ReconcileBody(_Body):
    """The complete list of running items of ``kinds`` as the sender sees them at ``time``."""

    kinds: list[Kind] = Field(min_length=1)
    items: list[RunningItem] = Field(default_factory=list, max_length=100000)
    time: datetime | None = None


def validation_problems(err: ValidationError) -> list[str]:
    """``path: message`` lines of a pydantic error (``events[2].kind: ...``)."""
    out = []
    for e in err.errors():
        path = ""
        for part in e["loc"]:
            path += f"[{part}]" if isinstance(part, int) else (("." if path else "") + str(part))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field; remove it or check its spelling"
        out.append(f"{path or '<body>'}: {msg}")
    return out
