"""The OpenAPI 3.1 document of the quota service, served at ``<prefix>/api/openapi.json``.

Request bodies are the JSON schemas of the pydantic models that validate them
(:mod:`workbench.services.quota.models`); a unit test checks that every route of the app is described.
"""

from __future__ import annotations

from pydantic.json_schema import models_json_schema

from workbench.services.quota.accounting import KINDS
from workbench.services.quota.authz import ACCESS_SCOPE, METRICS_SCOPE, READ_ALL_SCOPE, WRITE_SCOPE
from workbench.services.quota.models import AdmitBody, EventBatch, ReconcileBody, UsageEvent

REF = "#/components/schemas/{model}"


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERROR = _json(_ref("Error"), "error (JSON: status, message, problems)")
_AUTH = {"401": _json(_ref("Error"), "no token"), "403": _json(_ref("Error"), "the token may not do this")}

_PERIOD_PARAM = {
    "name": "period",
    "in": "query",
    "required": False,
    "description": "a month (2026-11), days (2026-11-01..2026-11-15), or current | month | term | total; "
    "default current (a group's budget period; a calendar month for users and the overview)",
    "schema": {"type": "string", "default": "current"},
}


def _usage_schemas() -> dict:
    num = {"type": "number"}
    usage = {
        "type": "object",
        "properties": {
            "gpu_hours": num,
            "cpu_hours": num,
            "gpu_seconds": num,
            "cpu_seconds": num,
            "gpu_hours_by_type": {"type": "object", "additionalProperties": num},
        },
        "required": ["gpu_hours", "cpu_hours", "gpu_seconds", "cpu_seconds", "gpu_hours_by_type"],
    }
    period = {
        "type": "object",
        "properties": {
            "kind": {"type": "string", "enum": ["month", "term", "total", "range"]},
            "name": {"type": "string"},
            "start": {"type": "string", "format": "date-time"},
            "end": {"type": ["string", "null"], "format": "date-time"},
        },
        "required": ["kind", "name", "start", "end"],
    }
    budget = {
        "type": "object",
        "properties": {
            "resource": {"type": "string", "enum": ["gpu", "cpu"]},
            "scope": {"type": "string", "enum": ["group", "user"]},
            "group": {"type": "string"},
            "user": {"type": ["string", "null"]},
            "used_hours": num,
            "limit_hours": num,
            "fraction": num,
            "exhausted": {"type": "boolean"},
            "period": _ref("Period"),
            "resets_at": {"type": ["string", "null"], "format": "date-time"},
        },
        "required": ["resource", "scope", "group", "used_hours", "limit_hours", "fraction", "period", "resets_at"],
    }
    running = {
        "type": "object",
        "properties": {
            "servers": {"type": "integer"},
            "dask_workers": {"type": "integer"},
            "gpus": {"type": "integer"},
            "gpus_by_type": {"type": "object", "additionalProperties": {"type": "integer"}},
            "cpu": num,
        },
    }
    by = {"type": ["object", "null"], "additionalProperties": _ref("Usage")}
    budgets = {"type": "array", "items": _ref("BudgetStatus")}
    return {
        "Error": {
            "type": "object",
            "properties": {
                "status": {"type": "integer"},
                "message": {"type": "string"},
                "problems": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["status", "message"],
        },
        "Usage": usage,
        "Period": period,
        "BudgetStatus": budget,
        "Running": running,
        "UserUsage": {
            "type": "object",
            "properties": {
                "user": {"type": "string"},
                "period": _ref("Period"),
                "as_of": {"type": "string", "format": "date-time"},
                "limited_to_groups": {"type": ["array", "null"], "items": {"type": "string"}},
                "usage": _ref("Usage"),
                "by_group": by,
                "by_kind": by,
                "running": _ref("Running"),
                "budgets": budgets,
            },
            "required": ["user", "period", "usage", "by_group", "by_kind", "running", "budgets"],
        },
        "GroupUsage": {
            "type": "object",
            "properties": {
                "group": {"type": "string"},
                "kind": {"type": ["string", "null"]},
                "period": _ref("Period"),
                "as_of": {"type": "string", "format": "date-time"},
                "usage": _ref("Usage"),
                "by_kind": by,
                "by_user": {**by, "description": "null unless the viewer is an admin or the course's instructor"},
                "running": _ref("Running"),
                "budgets": budgets,
                "caps": {"type": ["object", "null"]},
            },
            "required": ["group", "period", "usage", "by_kind", "by_user", "running", "budgets"],
        },
        "Overview": {
            "type": "object",
            "properties": {
                "period": _ref("Period"),
                "as_of": {"type": "string", "format": "date-time"},
                "usage": _ref("Usage"),
                "groups": {
                    "type": "object",
                    "additionalProperties": {
                        "type": "object",
                        "properties": {"usage": _ref("Usage"), "running": _ref("Running"), "budgets": budgets},
                    },
                },
            },
            "required": ["period", "usage", "groups"],
        },
        "EventResults": {
            "type": "object",
            "properties": {
                "results": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "id": {"type": "string"},
                            "status": {"type": "string", "enum": ["recorded", "duplicate", "already-open", "not-open"]},
                            "row": {"type": ["integer", "null"]},
                        },
                    },
                }
            },
            "required": ["results"],
        },
        "Decision": {
            "type": "object",
            "properties": {
                "allowed": {"type": "boolean"},
                "reason": {
                    "type": ["string", "null"],
                    "enum": [None, "gpu-budget", "cpu-budget", "running-servers", "running-gpus", "unknown-group"],
                },
                "message": {"type": "string"},
                "row": {"type": ["integer", "null"]},
                "item": {"type": "string"},
                "replayed": {"type": "boolean"},
                "budgets": budgets,
            },
            "required": ["allowed", "reason", "message", "row"],
        },
        "ReconcileResult": {
            "type": "object",
            "properties": {
                "opened": {"type": "array", "items": {"type": "string"}},
                "closed": {"type": "array", "items": {"type": "string"}},
                "running": {"type": "integer"},
            },
            "required": ["opened", "closed", "running"],
        },
        "Health": {
            "type": "object",
            "properties": {"status": {"type": "string"}, "database": {"type": "string"}},
            "required": ["status"],
        },
    }


def _enforcement_schemas() -> dict:
    s = {"type": "string"}
    t = {"type": ["string", "null"], "format": "date-time"}
    stop = {
        "type": "object",
        "properties": {
            "item": s,
            "kind": s,
            "user": s,
            "group": s,
            "reason": s,
            "deadline": t,
            "due": {"type": "boolean"},
            "message": s,
        },
        "required": ["item", "kind", "user", "group", "reason", "deadline", "due", "message"],
    }
    note = {
        "type": "object",
        "properties": {
            "level": {"type": "string", "enum": ["info", "warning", "critical"]},
            "source": s,
            "message": s,
            "at": t,
            "group": s,
            "resource": {"type": "string", "enum": ["gpu", "cpu"]},
            "fraction": {"type": "number"},
            "stops_at": t,
        },
        "required": ["level", "source", "message", "at"],
    }
    return {
        "StopItem": stop,
        "Enforcement": {
            "type": "object",
            "properties": {"as_of": t, "stop": {"type": "array", "items": _ref("StopItem")}},
            "required": ["as_of", "stop"],
        },
        "Notification": note,
        "Notifications": {
            "type": "object",
            "properties": {"user": s, "as_of": t, "notifications": {"type": "array", "items": _ref("Notification")}},
            "required": ["user", "as_of", "notifications"],
        },
    }


def openapi_document(prefix: str = "/services/quota/") -> dict:
    _, defs = models_json_schema(
        [
            (UsageEvent, "validation"),
            (EventBatch, "validation"),
            (AdmitBody, "validation"),
            (ReconcileBody, "validation"),
        ],
        ref_template=REF,
    )
    schemas = {**defs.get("$defs", {}), **_usage_schemas(), **_enforcement_schemas()}
    write = [{"hubToken": [WRITE_SCOPE]}]
    read = [{"hubToken": [ACCESS_SCOPE]}]
    paths = {
        "/api/health": {
            "get": {
                "summary": "Liveness and database reachability; the database and row counts only with a valid token",
                "operationId": "health",
                "security": [],
                "responses": {
                    "200": _json(_ref("Health"), "the service and its database answer"),
                    "503": _json(_ref("Health"), "the database does not answer (status: unhealthy)"),
                },
            }
        },
        "/api/openapi.json": {
            "get": {
                "summary": "This document",
                "operationId": "openapi",
                "security": [],
                "responses": {"200": _json({"type": "object"}, "the OpenAPI document")},
            }
        },
        "/api/events": {
            "post": {
                "summary": "Record start and stop events of servers, Dask schedulers and workers (idempotent by id)",
                "operationId": "postEvents",
                "security": write,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"oneOf": [_ref("EventBatch"), _ref("UsageEvent")]}}},
                },
                "responses": {
                    "200": _json(_ref("EventResults"), "one result per event, in order"),
                    "400": _ERROR,
                    **_AUTH,
                },
            }
        },
        "/api/admit": {
            "post": {
                "summary": "Check budgets and concurrency caps for a start and record it if allowed (atomic)",
                "operationId": "admit",
                "security": write,
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("AdmitBody")}}},
                "responses": {
                    "200": _json(_ref("Decision"), "allowed; the start is recorded"),
                    "403": _json(_ref("Decision"), "refused by a budget or a cap (or the token may not admit)"),
                    "400": _ERROR,
                    "401": _AUTH["401"],
                },
            }
        },
        "/api/reconcile": {
            "post": {
                "summary": "Make the ledger's open rows of some kinds match the complete list of running items",
                "operationId": "reconcile",
                "security": write,
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("ReconcileBody")}}},
                "responses": {"200": _json(_ref("ReconcileResult"), "rows opened and closed"), "400": _ERROR, **_AUTH},
            }
        },
        "/api/reconcile/hub": {
            "post": {
                "summary": "Reconcile notebook servers with the hub's list of active servers now (also done periodically)",
                "operationId": "reconcileHub",
                "security": write + [{"hubToken": ["admin"]}],
                "responses": {
                    "200": _json(_ref("ReconcileResult"), "rows opened and closed"),
                    "502": _json(_ref("Error"), "the hub did not answer"),
                    **_AUTH,
                },
            }
        },
        "/api/enforcement": {
            "get": {
                "summary": "Running items that draw on a spent budget, with the time each is stopped (budget.grace "
                "after the budget ran out); the gateway stops its Dask clusters' items, the service the servers",
                "operationId": "enforcement",
                "security": write + [{"hubToken": [READ_ALL_SCOPE]}],
                "parameters": [
                    {
                        "name": "kind",
                        "in": "query",
                        "required": False,
                        "description": "only items of this kind (repeatable)",
                        "schema": {"type": "string", "enum": list(KINDS)},
                    }
                ],
                "responses": {"200": _json(_ref("Enforcement"), "the plan"), **_AUTH},
            }
        },
        "/api/notifications": {
            "get": {
                "summary": "The calling user's budget warnings (past budget.warn_at, spent, when running work stops)",
                "operationId": "notifications",
                "security": read,
                "responses": {"200": _json(_ref("Notifications"), "most severe first"), "400": _ERROR, **_AUTH},
            }
        },
        "/api/usage": {
            "get": {
                "summary": "Usage of every group (admins and read-all tokens)",
                "operationId": "overview",
                "security": read,
                "parameters": [_PERIOD_PARAM],
                "responses": {"200": _json(_ref("Overview"), "usage by group"), "400": _ERROR, **_AUTH},
            }
        },
        "/api/usage/users/{user}": {
            "get": {
                "summary": "A user's usage: their own, an admin's view, or an instructor's view limited to their course",
                "operationId": "userUsage",
                "security": read,
                "parameters": [
                    {"name": "user", "in": "path", "required": True, "schema": {"type": "string"}},
                    _PERIOD_PARAM,
                ],
                "responses": {"200": _json(_ref("UserUsage"), "usage in the period"), "400": _ERROR, **_AUTH},
            }
        },
        "/api/usage/groups/{group}": {
            "get": {
                "summary": "A group's usage, budgets and caps (members, its instructors, admins)",
                "operationId": "groupUsage",
                "security": read,
                "parameters": [
                    {"name": "group", "in": "path", "required": True, "schema": {"type": "string"}},
                    _PERIOD_PARAM,
                ],
                "responses": {
                    "200": _json(_ref("GroupUsage"), "usage in the period"),
                    "400": _ERROR,
                    "404": _json(_ref("Error"), "no such group in the policy"),
                    **_AUTH,
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics: usage counters, budget and running gauges per group and GPU type",
                "operationId": "metrics",
                "security": [{"hubToken": [METRICS_SCOPE]}],
                "responses": {
                    "200": {
                        "description": "Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_AUTH,
                },
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Workbench quota service",
            "version": "1",
            "description": (
                "Usage ledger, budgets and concurrency caps of the Workbench, as a JupyterHub service. "
                "Authenticate with a JupyterHub token: `Authorization: token <token>`. Reading usage needs "
                f"`{ACCESS_SCOPE}`; writing events needs `{WRITE_SCOPE}`; `{READ_ALL_SCOPE}` reads everything."
            ),
        },
        "servers": [{"url": prefix.rstrip("/") or "/"}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "hubToken": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Authorization",
                    "description": "a JupyterHub API token, as `token <token>`",
                }
            },
        },
    }
