"""Start the engine replicas on Ray Serve and build the ingress that serves today's API over them.

The ingress is the `loraplex serve` process itself: today's FastAPI app (api/app.py) under
uvicorn, with the same HTTP flags and connection bounds, whose ApiContext.engine is a
RemoteEngine. Ray Serve's own HTTP proxy is not started: the replicas are reached through a
DeploymentHandle, whose router (serve/router.py) picks the replica for each request.

Order: `start_ray` (local, or join a cluster), `deploy` (blocks until every replica has loaded its
model), `build_ingress_context` (registry, store, tokenizer: this process), then create_app and
`install` (the x-loraplex-replica header, per-replica metrics) before serving. `undeploy` removes
the application (the replicas) and, when this process started Ray, stops it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import ray
from fastapi import FastAPI
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from loraplex.api.context import ApiContext
from loraplex.api.server import ServerOptions, api_context, open_adapter_store
from loraplex.config import ScaleoutConfig
from loraplex.engine.engine import resolve_model_dir
from loraplex.serve.metrics import ReplicaCollector
from loraplex.serve.remote_engine import RemoteEngine
from loraplex.serve.replica import EngineReplica
from loraplex.serve.replica_header import ReplicaHeaderMiddleware
from loraplex.serve.router import AffinityRouter, RoundRobinRouter
from loraplex.serve.training_task import ray_launch
from loraplex.tokenizer import Tokenizer

DEPLOYMENT_NAME = "EngineReplica"


def start_ray(address: str | None, num_cpus: float | None = None) -> bool:
    """Connect to Ray: a new local instance when `address` is None (num_cpus: what it offers;
    default: this machine's), else the cluster at `address` ("auto", "ray://host:10001", …).
    No dashboard. Returns whether this call started or joined Ray (False: it was already)."""
    if ray.is_initialized():
        return False
    if address is None:
        ray.init(num_cpus=num_cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    else:
        ray.init(address=address, include_dashboard=False, configure_logging=False, log_to_driver=False)
    return True


def deploy(options: ServerOptions, scaleout: ScaleoutConfig) -> DeploymentHandle:
    """Run `scaleout.replicas` EngineReplicas of `options` (each receives the whole ServerOptions)
    as the Serve application `scaleout.app_name`, replacing one of that name; returns its handle
    once every replica is up. The default model is converted here first, so that the replicas
    do not race to convert it.

    A process keeps the request-router class it first built for an application: to compare
    routers in one process (benchmarks), deploy each under its own `app_name`."""
    resolve_model_dir(options.engine.model.model, options.data_dir)
    if scaleout.router == "affinity":
        router = RequestRouterConfig(request_router_class=AffinityRouter,
                                     request_router_kwargs={"spill_in_flight": scaleout.spill_in_flight,
                                                            "sticky_s": scaleout.sticky_s},
                                     request_routing_stats_period_s=scaleout.routing_stats_period_s)
    else:
        router = RequestRouterConfig(request_router_class=RoundRobinRouter,
                                     request_routing_stats_period_s=scaleout.routing_stats_period_s)
    replica = serve.deployment(EngineReplica, name=DEPLOYMENT_NAME).options(
        num_replicas=scaleout.replicas, max_ongoing_requests=options.max_pending,
        ray_actor_options={"num_cpus": scaleout.replica_num_cpus, "num_gpus": scaleout.replica_num_gpus},
        request_router_config=router, graceful_shutdown_timeout_s=5)
    serve.start(proxy_location="Disabled")
    return serve.run(replica.bind(options), name=scaleout.app_name, route_prefix=None)


def build_ingress_context(options: ServerOptions, scaleout: ScaleoutConfig, handle: DeploymentHandle) -> ApiContext:
    """The ApiContext of the ingress: this process's registry, object store and tokenizer, a
    RemoteEngine over the replicas behind `handle`, and fine-tuning jobs trained as Ray tasks
    (serve/training_task.py) with `scaleout`'s train_num_cpus / train_num_gpus."""
    engine = RemoteEngine(handle, scaleout.app_name, scaleout.replicas, options.max_pending, scaleout.max_attempts)
    with ThreadPoolExecutor(1) as pool:  # (the handle's sync API must not run on an event loop)
        info = pool.submit(lambda: handle.model_info.remote().result()).result()
    tokenizer = Tokenizer.from_dir(resolve_model_dir(options.engine.model.model, options.data_dir))
    ctx = api_context(options, engine, open_adapter_store(options), tokenizer, info["model_args"], info["max_model_len"],
                      engine.cache_stats)
    ctx.launch_training = ray_launch(scaleout)
    return ctx


def install(app: FastAPI, ctx: ApiContext) -> FastAPI:
    """Add what the ingress serves beyond today's app: the x-loraplex-replica header on every
    response and the per-replica metrics."""
    app.add_middleware(ReplicaHeaderMiddleware)
    ctx.metrics.registry.register(ReplicaCollector(ctx.engine.replicas))
    return app


def undeploy(scaleout: ScaleoutConfig, stop_ray: bool) -> None:
    """Delete the application (its replicas shut down); with `stop_ray`, also stop this process's Ray."""
    try:
        serve.delete(scaleout.app_name)
    finally:
        if stop_ray:
            serve.shutdown()
            ray.shutdown()
