"""The quota service as its senders see it: the hub's spawner and the Dask Gateway (async, tornado).

``QuotaClient(api_url, token)`` talks to ``<service>/api`` with a hub token that carries
``custom:workbench-quota:write``:

- :meth:`admit` — before a start: budgets and caps are checked and the start recorded in one
  transaction; returns a :class:`Admission` (``allowed``, ``message``). Refusals are answers,
  not errors; a service that does not answer raises :class:`QuotaUnavailable` (callers refuse
  the start: budgets are enforced, not advisory).
- :meth:`stop` — after a stop: one stop event, retried briefly; the service's reconcile closes
  the row anyway if every try fails, so a stop is never blocked on the service.
- :meth:`reconcile` — the complete list of running items of some kinds.
- :meth:`enforcement` — the items to stop now because their budget is spent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass

from tornado.httpclient import AsyncHTTPClient

log = logging.getLogger("workbench.services.quota.client")

__all__ = ["QuotaClient", "Admission", "QuotaUnavailable"]


class QuotaUnavailable(Exception):
    """The quota service did not answer (or answered with an error that is not a decision)."""


@dataclass(frozen=True)
class Admission:
    allowed: bool
    reason: str | None
    message: str
    item: str


class QuotaClient:
    def __init__(self, api_url: str, token: str, timeout: float = 20.0):
        self.api_url = api_url.rstrip("/")
        self.token = token
        self.timeout = timeout

    async def _call(self, method: str, path: str, body=None, ok=(200,)) -> tuple[int, dict]:
        try:
            r = await AsyncHTTPClient().fetch(
                f"{self.api_url}{path}",
                method=method,
                body=json.dumps(body) if body is not None else None,
                headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
                request_timeout=self.timeout,
                raise_error=False,
            )
        except OSError as e:
            raise QuotaUnavailable(f"the quota service at {self.api_url} does not answer: {e}") from None
        if r.code not in ok:
            detail = (r.body or b"").decode(errors="replace")[:300]
            raise QuotaUnavailable(f"the quota service answered {r.code} to {method} {path}: {detail}")
        return r.code, json.loads(r.body or b"{}")

    async def admit(
        self, *, item: str, kind: str, user: str, group: str, request_id: str | None = None, **resources
    ) -> Admission:
        body = {
            "item": item,
            "kind": kind,
            "user": user,
            "group": group,
            "id": request_id or f"admit:{item}:{uuid.uuid4().hex}",
            **{k: v for k, v in resources.items() if v is not None},
        }
        code, doc = await self._call("POST", "/admit", body, ok=(200, 403))
        if code == 403 and "allowed" not in doc:  # the token itself was refused
            raise QuotaUnavailable(f"the quota service refused this sender: {doc.get('message')}")
        return Admission(bool(doc.get("allowed")), doc.get("reason"), doc.get("message", ""), item)

    async def events(self, events: list[dict]) -> list[dict]:
        """Record usage events as given (ids, types, items, times: the service's EventBatch); raises
        :class:`QuotaUnavailable` when the service does not take them. Ids are unique, so a retry counts once.
        Returns one ``{"id", "status", "row"}`` per event (status: recorded, duplicate, already-open, not-open)."""
        _, doc = await self._call("POST", "/events", {"events": events})
        return list(doc.get("results") or [])

    async def stop(self, item: str, tries: int = 3, delay: float = 1.0) -> bool:
        """Send a stop event for ``item``; False (logged) when the service never answered."""
        return await self.stop_many([item], tries, delay)

    async def stop_many(self, items: list[str], tries: int = 3, delay: float = 1.0) -> bool:
        """Stop events for several items in one request (retried like :meth:`stop`)."""
        if not items:
            return True
        events = [{"id": f"stop:{i}:{uuid.uuid4().hex}", "type": "stop", "item": i} for i in items]
        for attempt in range(tries):
            try:
                await self.events(events)
                return True
            except QuotaUnavailable as e:
                if attempt == tries - 1:
                    log.warning("could not record the stop of %s (the next reconcile will): %s", ", ".join(items), e)
                    return False
                await asyncio.sleep(delay * (attempt + 1))
        return False

    async def reconcile(self, kinds: list[str], items: list[dict]) -> dict:
        return (await self._call("POST", "/reconcile", {"kinds": kinds, "items": items}))[1]

    async def enforcement(self, kinds: list[str] | None = None) -> list[dict]:
        query = "&".join(f"kind={k}" for k in kinds or [])
        return (await self._call("GET", "/enforcement" + (f"?{query}" if query else "")))[1]["stop"]
