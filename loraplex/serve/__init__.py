"""Scale-out on Ray Serve: many engine replicas behind one API (`loraplex serve --replicas N`).

- deployment.py: start Ray, deploy the replicas, build the ingress (today's app over a RemoteEngine);
- replica.py: EngineReplica, one whole engine per Ray Serve replica;
- remote_engine.py: the AsyncEngine interface over the replicas (retries when a replica dies);
- router.py: Ray Serve request routers (adapter affinity; round robin as a baseline);
- routing.py: the affinity decision itself, a pure function;
- replica_header.py, metrics.py: x-loraplex-replica on every response; per-replica metrics.

Nothing under loraplex/api imports this package.
"""
