"""GPU utilisation that servers report themselves (Slurm jobs on compute nodes): the report's checks, which
servers take which report, and the reporter's environment (workbench.services.sessions.report)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest

from workbench.services.sessions.report import Reports, devices_of, main, parse_report, report_url
from workbench.services.sessions.rules import Server, update_gpu_idle
from workbench.spawn.slurm import WorkbenchSlurmSpawner

T0 = datetime(2026, 5, 4, 10, 0, tzinfo=UTC)


def server(user: str, name: str = "", devices: tuple[str, ...] = (), started: datetime = T0) -> Server:
    return Server(user, name, "h100-x2", ("physics-lab",), started, started, gpu_devices=devices)


@pytest.mark.parametrize(
    "body, message",
    [
        ([], "the body must be a JSON object"),
        ({"utilisation": {"0": 1}, "user": "researcher"}, "unknown fields ['user']"),
        ({"server": 3, "utilisation": {"0": 1}}, "server: the server's name"),
        ({"utilisation": {}}, "utilisation: an object {<device>: <percent 0-100>} with at least one device"),
        ({"utilisation": {"0": 101}}, "utilisation.0: a percentage 0-100, got 101"),
        ({"utilisation": {"0": True}}, "utilisation.0: a percentage 0-100, got True"),
        ({"utilisation": {"0": float("nan")}}, "utilisation.0: a percentage 0-100"),
        ({"utilisation": {str(i): 1 for i in range(65)}}, "utilisation: at most 64 devices, got 65"),
    ],
)
def test_a_bad_report_is_refused_naming_the_field(body, message):
    with pytest.raises(ValueError) as e:
        parse_report(body)
    assert message in str(e.value)


def test_a_report_counts_for_its_senders_own_fresh_server_only():
    reports = Reports(max_age=60)
    assert reports.add("student1", parse_report({"server": "", "utilisation": {"0": 0, "1": 0}}), T0, 5) is True
    assert reports.add("researcher", parse_report({"utilisation": {"0": 90, "1": 0}}), T0, 5) is True  # first
    assert reports.add("researcher", parse_report({"utilisation": {"0": 80, "1": 0}}), T0, 5) is False  # still busy
    assert reports.add("researcher", parse_report({"utilisation": {"0": 2.5, "1": 0}}), T0, 5) is True  # idle now
    servers = [server("researcher"), server("student1"), server("local", devices=("GPU-abc",))]
    out, samples = reports.apply(servers, {"GPU-abc": 50.0}, T0 + timedelta(seconds=5))
    # researcher's devices are researcher's report, never student1's (the user is the token's, not the body's)
    assert out[0].gpu_devices == ("reported:researcher/:0", "reported:researcher/:1")
    assert samples["reported:researcher/:0"] == 2.5 and samples["reported:student1/:0"] == 0
    assert out[2].gpu_devices == ("GPU-abc",)  # a server the service samples itself ignores reports
    idle = update_gpu_idle({}, out, samples, T0 + timedelta(seconds=5), threshold=5)
    assert set(idle) == {out[0].key, out[1].key}
    # a stale report, or one from before the server's start (an earlier run), counts as none: unknown, not idle
    later = T0 + timedelta(seconds=61)
    out, samples = reports.apply([server("researcher"), server("student1", started=T0 + timedelta(1))], {}, later)
    assert [s.gpu_devices for s in out] == [(), ()] and samples == {}


def test_the_reporter_reads_the_jobs_devices_from_the_pretend_file_and_posts_them(tmp_path, monkeypatch):
    """The GPU reader is the named mock: a JSON file (as for local servers with --fake-gpus)."""
    util = tmp_path / "util.json"
    util.write_text(json.dumps({"0": 12.0, "1": 0.0, "2": 99.0}))
    env = {
        "CUDA_VISIBLE_DEVICES": "0,1",
        "WORKBENCH_GPU_UTILISATION_FILE": str(util),
        "WORKBENCH_SERVICES_URL": "http://127.0.0.1:8000/services/",
        "JUPYTERHUB_API_TOKEN": "t0ken",
        "JUPYTERHUB_SERVER_NAME": "",
    }
    assert devices_of(env) == ["0", "1"]
    assert report_url(env) == "http://127.0.0.1:8000/services/sessions/api/gpu-utilisation"
    sent = []
    monkeypatch.setattr(
        "workbench.services.sessions.report.send", lambda url, token, body: sent.append((url, token, body))
    )
    assert main(["--once"], env) == 0
    assert sent == [(report_url(env), "t0ken", {"server": "", "utilisation": {"0": 12.0, "1": 0.0}})]
    sent.clear()
    assert main(["--once"], {**env, "CUDA_VISIBLE_DEVICES": ""}) == 0 and sent == []  # a CPU job reports nothing


class FakeQuota:
    """Stands in for the quota service's answers (the integration tests run the real one)."""

    def __init__(self, answers):
        self.answers, self.sent = list(answers), []

    async def _send_events(self, events):
        self.sent.append(events)
        return self.answers.pop(0)


def test_the_end_of_a_job_whose_row_the_reconcile_closed_is_recorded_as_its_own_row():
    stop = {"id": "slurm-stop:server:researcher/:42", "type": "stop", "item": "server:researcher/", "time": "t1"}
    resume = {"id": "slurm-resume:server:researcher/:42", "type": "start", "item": "server:researcher/", "time": "t0"}
    q = FakeQuota([[{"status": "not-open"}], [{"status": "recorded"}, {"status": "recorded"}]])
    spawner = SimpleNamespace(_send_events=q._send_events, log=SimpleNamespace(info=lambda *a: None),
                              user=SimpleNamespace(name="researcher"))  # fmt: skip
    assert asyncio.run(WorkbenchSlurmSpawner._deliver_stop(spawner, stop, resume)) is True
    assert q.sent == [[stop], [resume, {**stop, "id": "slurm-end:server:researcher/:42"}]]
    q = FakeQuota([[{"status": "recorded"}]])
    spawner._send_events = q._send_events
    assert asyncio.run(WorkbenchSlurmSpawner._deliver_stop(spawner, stop, resume)) is True and q.sent == [[stop]]
    q = FakeQuota([None])  # the quota service does not answer (yet): the caller retries later
    spawner._send_events = q._send_events
    assert asyncio.run(WorkbenchSlurmSpawner._deliver_stop(spawner, stop, resume)) is False
