"""The scale-out server for tests: a local Ray (started once per module, small), engine replicas
on Ray Serve, and the ingress under uvicorn in a thread of the test process (tests/api_server.py),
so tests can reach the RemoteEngine (ctx.engine) directly."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import ray
from ray import serve

from api_server import LiveServer
from loraplex.api.app import create_app
from loraplex.api.server import ServerOptions
from loraplex.config import ScaleoutConfig
from loraplex.serve.deployment import build_ingress_context, deploy, install, start_ray, undeploy

RAY_CPUS = 2  # the local Ray offers this much; each replica takes REPLICA_CPUS of it
REPLICA_CPUS = 0.5


def start_local_ray() -> None:
    """A local Ray for the test process: no dashboard, two CPUs, one torch thread per worker."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ["OMP_NUM_THREADS"] = "1"
    start_ray(None, num_cpus=RAY_CPUS)


def stop_local_ray() -> None:
    serve.shutdown()
    ray.shutdown()


def scaleout_config(replicas: int = 2, **overrides) -> ScaleoutConfig:
    """Replicas small enough that two fit on the local Ray, routing stats collected often."""
    return ScaleoutConfig(replicas=replicas, replica_num_cpus=REPLICA_CPUS, routing_stats_period_s=0.2, **overrides)


@dataclass
class ScaleoutServer:
    live: LiveServer
    scaleout: ScaleoutConfig

    @classmethod
    def start(cls, options: ServerOptions, scaleout: ScaleoutConfig) -> ScaleoutServer:
        ctx = build_ingress_context(options, scaleout, deploy(options, scaleout))
        live = LiveServer.serve(ctx, install(create_app(ctx), ctx), options)
        server = cls(live, scaleout)
        server.wait_for_replicas(scaleout.replicas)
        return server

    @property
    def url(self) -> str:
        return self.live.url

    @property
    def ctx(self):
        return self.live.ctx

    def stop(self) -> None:
        self.live.stop()
        undeploy(self.scaleout, stop_ray=False)

    def replica_ids(self) -> list[str]:
        return sorted(self.ctx.engine.replicas())

    def wait_for_replicas(self, count: int, without: str | None = None, timeout_s: float = 120) -> list[str]:
        """Until the router knows `count` running replicas reporting stats (none of them `without`)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            reports = self.ctx.engine.replicas()
            if len(reports) == count and without not in reports and all("engine" in r for r in reports.values()):
                return sorted(reports)
            time.sleep(0.1)
        raise AssertionError(f"not {count} replicas running: {sorted(self.ctx.engine.replicas())}")
