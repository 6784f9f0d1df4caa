"""The fast-start pieces of the gateway (workbench.gateway.fast_start, workbench.gateway.scheduler_preload):
commands, the workers' start method, and a preload that parses upstream's options and heartbeats at once."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from dask_gateway import scheduler_preload as upstream

from workbench.gateway import scheduler_preload
from workbench.gateway.fast_start import PRELOAD, WORKER_ENVIRONMENT, scheduler_command, worker_command


def test_commands_import_distributed_directly():
    assert scheduler_command("/v/bin") == ["/v/bin/python", "-m", "distributed.cli.dask_scheduler"]
    assert worker_command("/v/bin") == ["/v/bin/python", "-m", "distributed.cli.dask_worker"]
    assert WORKER_ENVIRONMENT == {"DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD": "fork"}


def test_local_gateway_config_uses_them(tmp_path, monkeypatch):
    from traitlets.config import Config

    import workbench.gateway.config as cfgmod

    c = Config()
    rt = SimpleNamespace(
        state_dir=tmp_path,
        venv_bin="/v/bin",
        gateway_port=1,
        gateway_http_port=2,
        gateway_tcp_port=3,
        hub_port=4,
        system_users=False,
        user_prefix="wb-",
        path=lambda name: tmp_path / name,
        config="unused.yaml",
        quota_port=0,
        gateway_backend="local",
    )
    monkeypatch.setattr(cfgmod, "load_or_create_secrets", lambda d: {"gateway_db_key": "k"})
    cfgmod.configure_gateway(c, rt, policy=SimpleNamespace())
    assert c.ClusterConfig.scheduler_cmd == scheduler_command("/v/bin")
    assert c.ClusterConfig.worker_cmd == worker_command("/v/bin")
    assert c.ClusterConfig.environment["DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD"] == "fork"
    assert c.ClusterConfig.environment["PATH"].startswith("/v/bin:")


def test_backends_swap_the_preload_and_keep_its_options():
    from workbench.gateway.local import WorkbenchUnsafeLocalBackend

    cluster = SimpleNamespace(
        config=SimpleNamespace(scheduler_cmd=["py", "-m", "s"], adaptive_period=3.0, idle_timeout=0.0)
    )
    backend = WorkbenchUnsafeLocalBackend.__new__(WorkbenchUnsafeLocalBackend)  # no traitlets set-up needed
    backend.cluster_heartbeat_period = 15
    cmd = backend.get_scheduler_command(cluster)
    i = cmd.index("--preload")
    assert cmd[i + 1] == PRELOAD
    assert "dask_gateway.scheduler_preload" not in cmd
    assert cmd[i + 2 :] == [
        "--dg-api-address", "127.0.0.1:0", "--dg-heartbeat-period", "15",
        "--dg-adaptive-period", "3.0", "--dg-idle-timeout", "0.0",
    ]  # fmt: skip


def test_preload_parses_upstreams_options():
    ctx = scheduler_preload.dask_setup.make_context(
        "dask_setup", ["--dg-api-address", "127.0.0.1:0", "--dg-heartbeat-period", "15"]
    )
    assert ctx.params["dg_api_address"] == "127.0.0.1:0"
    assert ctx.params["dg_heartbeat_period"] == 15.0
    assert {p.name for p in scheduler_preload.dask_setup.params} == {p.name for p in upstream.dask_setup.params}


class _Scheduler:
    address = "tls://127.0.0.1:1234"
    services: dict = {}

    def __init__(self):
        self.plugins = []
        self.loop = None

    def add_plugin(self, plugin):
        self.plugins.append(plugin)


class _Gateway:
    token = "t"

    def __init__(self):
        self.sent = asyncio.Event()

    async def heartbeat(self, msg):
        self.msg = msg
        self.sent.set()


def test_first_heartbeat_goes_out_at_once():
    async def main():
        gw = _Gateway()
        service = scheduler_preload.FastHeartbeatService(_Scheduler(), gateway=gw, heartbeat_period=15)
        assert service.heartbeat_initial == 0.0 and service.heartbeat_max == 15
        service.listen(("127.0.0.1", 0))
        try:
            await asyncio.wait_for(gw.sent.wait(), 5)  # upstream's first one waits 0.25 s; this one does not sleep
        finally:
            service.stop()
        assert gw.msg["scheduler_address"] == "tls://127.0.0.1:1234"
        assert gw.msg["api_address"].startswith("http://127.0.0.1:")

    asyncio.run(main())


def test_heartbeats_only_when_scaling_stay_so():
    service = scheduler_preload.FastHeartbeatService(_Scheduler(), gateway=_Gateway(), heartbeat_period=0)
    assert service.heartbeat_initial == 3600  # upstream's meaning of period 0 is kept
