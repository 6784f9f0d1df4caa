"""Unit tests of a run's gateway access in the jobs service (workbench.jobs.runend, store, wiring).

A stand-in :class:`GatewayAccess` (a plain class recording calls) replaces the hub and gateway in the
end-of-run test; the real hub and gateway are in tests/integration/test_jobs_local.py.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
from pathlib import Path

from workbench.jobs.engines import Account
from workbench.jobs.gateway import TOKEN_FILE
from workbench.jobs.runend import end_gateway_access, token_file_command, write_token_file
from workbench.jobs.store import JobStore
from workbench.jobs.wiring import jobs_roles_for, token_scopes
from workbench.policy import load_policy

DEMO = Path(__file__).resolve().parents[2] / "hub_config" / "demo.yaml"


def _job(jid: str, state: str, token: str | None) -> dict:
    return {
        "id": jid,
        "user": "researcher",
        "submitter": "researcher",
        "grp": "physics-lab",
        "profile": "cpu-small",
        "notebook": "a.ipynb",
        "name": "a",
        "run": "r",
        "run_dir": "/x",
        "params": "{}",
        "time_limit": 60,
        "engine": "local",
        "state": state,
        "submitted": 1.0,
        "cpu": 1,
        "gpu_count": 0,
        "gateway_token": token,
    }


def test_service_may_mint_tokens_only_for_policy_group_members():
    policy = load_policy(DEMO)
    scopes = token_scopes(policy)
    assert scopes == [f"tokens!group={g}" for g in policy.groups]
    assert "tokens" not in scopes  # never unfiltered: no service's or outside account's tokens
    service_role = next(r for r in jobs_roles_for(policy, True) if r.get("services") == ["jobs"])
    assert set(scopes) <= set(service_role["scopes"])


def test_token_file_is_written_0600_and_replaces_a_planted_link(tmp_path):
    run_dir = tmp_path / "jobs" / "a" / "r1"
    run_dir.mkdir(parents=True)
    target = tmp_path / "victim"
    target.write_text("keep")
    (run_dir / TOKEN_FILE).symlink_to(target)  # the user planted a link: only the user's own rights apply anyway
    write_token_file(Account(os.environ.get("USER", "me"), str(tmp_path)), {"run_dir": str(run_dir)}, "tok-123")
    path = run_dir / TOKEN_FILE
    assert not path.is_symlink() and path.read_text() == "tok-123"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert target.read_text() == "keep"


def test_token_file_command_has_no_token_in_it():
    cmd = token_file_command("/home/u/jobs/a b/r1")
    assert cmd[:2] == ["sh", "-c"] and "'/home/u/jobs/a b/r1'" in cmd[2]


def test_old_table_gets_the_gateway_token_column(tmp_path):
    db = sqlite3.connect(tmp_path / "jobs.sqlite")
    db.execute("CREATE TABLE jobs (id TEXT PRIMARY KEY, state TEXT)")
    db.commit()
    db.close()
    store = JobStore(tmp_path / "jobs.sqlite")
    cols = {r["name"] for r in store.db.execute("PRAGMA table_info(jobs)")}
    assert "gateway_token" in cols


class StandInAccess:
    """Records ``end`` calls; fails the first time for job ids in ``fail_once``."""

    def __init__(self, fail_once=()):
        self.ended, self.fail_once = [], set(fail_once)

    async def end(self, job):
        if job["id"] in self.fail_once:
            self.fail_once.discard(job["id"])
            raise OSError("gateway down")
        self.ended.append(job["id"])


def test_every_kind_of_end_ends_the_gateway_access_once_and_a_failure_is_retried(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    for jid, state in [("c", "completed"), ("f", "failed"), ("x", "cancelled"), ("t", "timeout"), ("r", "running")]:
        store.add(_job(jid, state, f"a{jid}"))
    store.add(_job("n", "completed", None))  # no gateway access
    access = StandInAccess(fail_once={"x"})
    asyncio.run(end_gateway_access(store, access))
    assert sorted(access.ended) == ["c", "f", "t"]
    assert store.get("x")["gateway_token"] == "ax"  # kept for the next round
    asyncio.run(end_gateway_access(store, access))
    assert sorted(access.ended) == ["c", "f", "t", "x"]
    asyncio.run(end_gateway_access(store, access))
    assert len(access.ended) == 4  # each once; the running job's access stays
    assert store.get("r")["gateway_token"] == "ar"
