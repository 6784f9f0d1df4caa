"""Pure parts of the quota service: authorization, hub servers as items, OpenAPI, hub wiring, reports."""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
from pathlib import Path

import pytest

from tests.quota_support import POLICY, Clock, running, start, stop, t
from workbench.runtime import Runtime
from workbench.services.quota.accounting import Interval, month_period
from workbench.services.quota.app import QuotaService
from workbench.services.quota.authz import (
    ACCESS_SCOPE,
    READ_ALL_SCOPE,
    WRITE_SCOPE,
    Forbidden,
    Viewer,
    can_read_group,
    can_read_members,
    check_group,
    user_scope,
)
from workbench.services.quota.ledger import Ledger, default_db_url
from workbench.services.quota.openapi import openapi_document
from workbench.services.quota.report import add_report_arguments, cmd_report, report_csv, report_json, report_rows
from workbench.services.quota.views import charge_group, server_items
from workbench.services.quota.wiring import add_quota_service, pass_db_url

# -- authorization -----------------------------------------------------------------------------

RESEARCHER = Viewer("researcher", groups=frozenset({"physics-lab"}), scopes=frozenset({ACCESS_SCOPE}))
STUDENT = Viewer("student1", groups=frozenset({"course-ml101"}), scopes=frozenset({ACCESS_SCOPE}))
INSTRUCTOR = Viewer("instructor", groups=frozenset({"course-ml101"}), scopes=frozenset({ACCESS_SCOPE}))
ADMIN = Viewer("admin", admin=True, groups=frozenset({"platform-admins"}))
GATEWAY = Viewer("dask-gateway", kind="service", scopes=frozenset({WRITE_SCOPE}))
DASHBOARD = Viewer("grafana", kind="service", scopes=frozenset({READ_ALL_SCOPE}))


def test_users_read_themselves_and_their_groups_totals():
    assert user_scope(POLICY, RESEARCHER, "researcher", ["physics-lab"]) is None
    assert can_read_group(POLICY, RESEARCHER, "physics-lab")
    assert not can_read_members(POLICY, RESEARCHER, "physics-lab")  # totals, not colleagues
    assert not can_read_group(POLICY, RESEARCHER, "course-ml101")
    with pytest.raises(Forbidden, match="researcher may not read the usage of student1"):
        user_scope(POLICY, RESEARCHER, "student1", ["course-ml101"])
    with pytest.raises(Forbidden):
        user_scope(POLICY, STUDENT, "student2", ["course-ml101"])  # classmates are private
    with pytest.raises(Forbidden):
        check_group(POLICY, STUDENT, "physics-lab")


def test_instructors_read_their_course_only():
    assert user_scope(POLICY, INSTRUCTOR, "student1", ["course-ml101", "physics-lab"]) == {"course-ml101"}
    assert can_read_members(POLICY, INSTRUCTOR, "course-ml101")
    with pytest.raises(Forbidden):
        user_scope(POLICY, INSTRUCTOR, "researcher", ["physics-lab"])
    assert not can_read_group(POLICY, INSTRUCTOR, "physics-lab")


def test_admins_and_read_all_tokens_read_everything_services_do_not():
    for v in (ADMIN, DASHBOARD):
        assert user_scope(POLICY, v, "anyone", []) is None
        assert can_read_members(POLICY, v, "physics-lab")
    assert not can_read_group(POLICY, GATEWAY, "physics-lab")
    assert GATEWAY.writes and not RESEARCHER.writes
    assert ADMIN.reads_metrics and not RESEARCHER.reads_metrics


def test_viewer_from_hub_model():
    v = Viewer.from_model({"kind": "user", "name": "a", "admin": False, "groups": ["g"], "scopes": [ACCESS_SCOPE]})
    assert v.groups == {"g"} and ACCESS_SCOPE in v.scopes and not v.reads_all


# -- servers as the hub lists them ------------------------------------------------------------


def test_server_items_from_hub_users():
    users = [
        {
            "name": "researcher",
            "groups": ["physics-lab"],
            "servers": {
                "": {
                    "started": "2026-11-30T09:00:00.123456Z",
                    "user_options": {"profile": "h100-x1"},
                    "stopped": False,
                },
            },
        },
        {
            "name": "student1",
            "groups": ["course-ml101"],
            "servers": {
                "": {"started": "2026-11-30T10:00:00Z", "user_options": {}},
                "stopped-one": {"stopped": True},
            },
        },
        {"name": "stranger", "groups": [], "servers": {"": {"started": None, "user_options": {"profile": "bogus"}}}},
    ]
    items = {i.item: i for i in server_items(POLICY, users)}
    assert set(items) == {"server:researcher/", "server:student1/", "server:stranger/"}
    r = items["server:researcher/"]
    assert (r.group, r.profile, r.started_at) == ("physics-lab", "h100-x1", t(2026, 11, 30, 9, 0, 0, 123456))
    s = items["server:student1/"]
    assert (s.group, s.profile) == ("course-ml101", "cpu-small")  # the spawner's default: first entitled profile
    x = items["server:stranger/"]
    assert (x.group, x.profile, x.cpu) == ("-", None, 0.0)


def test_charge_group_is_the_first_entitled_group():
    assert charge_group(POLICY, ["startup-acme", "physics-lab"], "h100-x1") == "physics-lab"
    assert charge_group(POLICY, ["startup-acme", "physics-lab"], "cpu-small") == "startup-acme"
    assert charge_group(POLICY, [], "cpu-small") is None


# -- OpenAPI -----------------------------------------------------------------------------------


def _refs(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


def test_openapi_describes_every_route(tmp_path):
    ledger = Ledger(default_db_url(tmp_path), POLICY)
    svc = QuotaService(ledger, POLICY, hub_auth=None, hub=None)
    app = svc.make_app()
    doc = openapi_document(svc.prefix)
    routes = set()
    for rule in app.wildcard_router.rules:
        pattern = rule.matcher.regex.pattern.rstrip("$")
        path = pattern.removeprefix(svc.prefix.rstrip("/")).replace("\\.", ".")
        path = re.sub(r"\(\[\^/\]\+\)", "{x}", path)
        routes.add(path)
    documented = {re.sub(r"\{[^}]+\}", "{x}", p) for p in doc["paths"]}
    assert routes == documented
    assert doc["openapi"].startswith("3.") and doc["servers"] == [{"url": "/services/quota"}]
    schemas = doc["components"]["schemas"]
    for ref in _refs(doc):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
    assert {"UsageEvent", "EventBatch", "AdmitBody", "ReconcileBody", "Decision", "UserUsage"} <= set(schemas)
    json.dumps(doc)
    svc.pool.shutdown()
    ledger.close()


def test_openapi_is_a_valid_json_schema_where_it_has_schemas():
    jsonschema = pytest.importorskip("jsonschema")
    doc = openapi_document()
    for schema in doc["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)


# -- hub wiring --------------------------------------------------------------------------------


def make_runtime(**kw):
    values = dict(
        config="/srv/wb/platform.yaml",
        state_dir="/srv/wb/state",
        hub_config_dir="/srv/wb/hub_config",
        venv_bin="/srv/wb/.venv/bin",
        proxy_command="/usr/bin/configurable-http-proxy",
    )
    values.update(kw)
    return Runtime(**values)


def base_settings():
    return {
        "JupyterHub": {"services": [{"name": "dask-gateway"}], "load_roles": [{"name": "x"}]},
        "Spawner": {"server_token_scopes": ["access:servers!server"]},
    }


def test_quota_service_is_wired_only_with_a_port():
    assert add_quota_service(base_settings(), POLICY, make_runtime(), {}) == base_settings()
    s = add_quota_service(base_settings(), POLICY, make_runtime(quota_port=18014), {"quota_api_token": "qt"})
    svc = s["JupyterHub"]["services"][-1]
    assert svc == {
        "name": "quota",
        "url": "http://127.0.0.1:18014",
        "api_token": "qt",
        "command": ["/srv/wb/.venv/bin/python", "-m", "workbench.services.quota", "--enforce-every=30"],
        "cwd": "/srv/wb/state",
        "environment": {"WORKBENCH_RUNTIME": "/srv/wb/state/runtime.json"},
    }
    roles = {r["name"]: r for r in s["JupyterHub"]["load_roles"]}
    assert roles["workbench-quota-users"]["groups"] == list(POLICY.groups)
    assert roles["workbench-quota-users"]["scopes"] == ["access:services!service=quota"]
    assert roles["workbench-quota-service"]["services"] == ["quota"]
    assert WRITE_SCOPE in roles["workbench-quota-service"]["scopes"]
    assert roles["workbench-quota-writers"] == {
        "name": "workbench-quota-writers",
        "description": roles["workbench-quota-writers"]["description"],
        "scopes": [WRITE_SCOPE],
        "services": ["dask-gateway"],
    }
    assert set(s["JupyterHub"]["custom_scopes"]) == {WRITE_SCOPE, READ_ALL_SCOPE}
    assert s["Spawner"]["server_token_scopes"] == ["access:servers!server", ACCESS_SCOPE]


def test_db_url_comes_from_the_hubs_environment_only():
    s = add_quota_service(base_settings(), POLICY, make_runtime(quota_port=1), {"quota_api_token": "qt"})
    pass_db_url(s, {})
    assert "WORKBENCH_QUOTA_DB_URL" not in s["JupyterHub"]["services"][-1]["environment"]
    pass_db_url(s, {"WORKBENCH_QUOTA_DB_URL": "postgresql://u:p@db/q"})
    assert s["JupyterHub"]["services"][-1]["environment"]["WORKBENCH_QUOTA_DB_URL"] == "postgresql://u:p@db/q"
    assert "WORKBENCH_QUOTA_DB_URL" not in s["JupyterHub"]["services"][0].get("environment", {})


def test_hub_settings_wire_the_quota_service():
    from workbench.embedded.hub import hub_settings
    from workbench.policy import load_policy

    demo = load_policy(Path(__file__).resolve().parents[2] / "hub_config" / "demo.yaml")
    from workbench.runtime import SECRET_NAMES

    secrets = {n: "ab" * 32 for n in SECRET_NAMES}
    s = hub_settings(demo, make_runtime(quota_port=18014), secrets)
    assert "quota" in [svc["name"] for svc in s["JupyterHub"]["services"]]
    assert ACCESS_SCOPE in s["Spawner"]["server_token_scopes"]
    # every start is admitted by the service and every stop recorded, with the service's own token
    assert s["WorkbenchLocalSpawner"]["quota_api_url"] == "http://127.0.0.1:18014/services/quota/api"
    assert s["WorkbenchLocalSpawner"]["quota_api_token"] == secrets["quota_api_token"]
    roles = {r["name"]: r for r in s["JupyterHub"]["load_roles"]}
    assert "delete:servers" in roles["workbench-quota-service"]["scopes"]  # stops servers of spent budgets
    plain = hub_settings(demo, make_runtime(), secrets)
    assert "quota" not in [svc["name"] for svc in plain["JupyterHub"]["services"]]


def test_the_quota_service_checks_as_often_as_workbench_up_says():
    s = add_quota_service(
        base_settings(), POLICY, make_runtime(quota_port=1, quota_every=2.5), {"quota_api_token": "q"}
    )
    assert s["JupyterHub"]["services"][-1]["command"][-1] == "--enforce-every=2.5"


# -- reports -----------------------------------------------------------------------------------


def sample_rows():
    return [
        Interval(
            "server:a/",
            "server",
            "a",
            "physics-lab",
            t(2026, 10, 31, 23),
            t(2026, 11, 1, 1),
            cpu=8,
            gpu_type="h100",
            gpu_count=1,
        ),
        Interval(
            "dask-worker:c/1",
            "dask-worker",
            "a",
            "physics-lab",
            t(2026, 11, 2),
            t(2026, 11, 2, 2),
            cpu=1,
            gpu_type="h100-mig-1g",
            gpu_count=1,
        ),
        Interval("server:s/", "server", "s", "course-ml101", t(2026, 11, 30, 23), None, cpu=1),
    ]


def test_report_rows_clip_to_the_period():
    rows = report_rows(sample_rows(), month_period(2026, 11), t(2026, 12, 1, 1))
    assert [(r["group"], r["user"], r["kind"], r["gpu_type"], r["gpu_hours"], r["cpu_hours"]) for r in rows] == [
        ("course-ml101", "s", "server", "", 0.0, 1.0),  # running: counted to the end of November
        ("physics-lab", "a", "dask-worker", "h100-mig-1g", 2.0, 2.0),
        ("physics-lab", "a", "server", "h100", 1.0, 8.0),  # only the hour inside November
    ]


def test_report_csv_and_json():
    text = report_csv(sample_rows(), month_period(2026, 11), t(2026, 12, 1, 1))
    rows = list(csv.DictReader(io.StringIO(text)))
    assert rows[0]["period"] == "2026-11" and rows[0]["period_start"] == "2026-11-01T00:00:00Z"
    assert len(rows) == 3
    doc = json.loads(report_json(sample_rows(), month_period(2026, 11), t(2026, 12, 1, 1), POLICY))
    assert doc["usage"]["gpu_hours"] == 3.0
    assert doc["groups"]["physics-lab"]["usage"]["gpu_hours_by_type"] == {"h100": 1.0, "h100-mig-1g": 2.0}
    assert doc["groups"]["physics-lab"]["budget"] == {"gpu_hours": 500.0, "cpu_hours": 20000.0, "period": "month"}
    assert list(doc["groups"]) == ["physics-lab", "course-ml101"]  # policy order


def test_cmd_report_reads_the_ledger(tmp_path, capsys):
    ledger = Ledger(default_db_url(tmp_path), POLICY, clock=Clock(t(2026, 12, 2)))
    ledger.record(start("dask-worker:c/1", gpu_type="h100", gpu_count=2, time=t(2026, 11, 30, 22)))
    ledger.record(stop("dask-worker:c/1", time=t(2026, 12, 1, 1)))
    ledger.reconcile([running("server:researcher/", started=t(2026, 11, 30, 23, 30))], kinds=["server"])
    ledger.close()
    parser = add_report_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--period", "2026-11", "--state-dir", str(tmp_path), "--format", "json"])
    args.config = None
    assert cmd_report(args, now=t(2026, 12, 2)) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["groups"]["physics-lab"]["usage"]["gpu_hours"] == 4.0  # 2 GPUs x 2 h in November
    assert doc["groups"]["physics-lab"]["usage"]["cpu_hours"] == 2.0 + 0.5 * 4  # worker 2 h x 1 + server 0.5 h x 4
    png = tmp_path / "usage.png"
    args = parser.parse_args(["--period", "2026-11", "--state-dir", str(tmp_path), "--format", "png", "-o", str(png)])
    assert cmd_report(args, now=t(2026, 12, 2)) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = parser.parse_args(["--period", "2026-13", "--state-dir", str(tmp_path)])
    assert cmd_report(bad, now=t(2026, 12, 2)) == 2
    missing = parser.parse_args(["--state-dir", str(tmp_path / "nowhere")])
    assert cmd_report(missing, now=t(2026, 12, 2)) == 2
    assert "no ledger at" in capsys.readouterr().err
