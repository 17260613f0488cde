"""Where the roles run: a Ray cluster (local by default), W learner actors and E engine actors.

Resources per actor (``cpus`` each, ``gpus`` each on GPU clusters; an engine of tensor-parallel degree ``tp``
takes ``tp`` shares, one per vLLM worker)::

    disaggregated   W learners + E engines, each its own share:     need (W + E * tp) * cpus  CPUs
    colocated       learner i and engine i share a placement bundle: need max(W, E) * cpus CPUs  (each half of it;
                    tp = 1 only)

Both are checked against the cluster before any actor starts (:func:`check_resources`), and an explicit
``--ray-address`` is probed with a TCP connect first (:func:`check_address`), so a typo fails in a second.
Local clusters run with ``RAY_AUTH_MODE=disabled`` (Ray 2.60 turns token auth on by default; a remote cluster
keeps whatever its head node was started with).
"""
from __future__ import annotations

import os
import socket


class LaunchError(ValueError):
    """The run cannot start as configured or placed; raised before any actor starts (the CLI: one line, exit 2)."""


class ClusterUnreachable(LaunchError, ConnectionError):
    """Nothing answers at ``ray_address``."""


ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
LOOPBACK_ENV = {"GLOO_SOCKET_IFNAME": "lo"}   # gloo on 127.0.0.1 (a single-machine cluster)


def check_address(address: str, timeout_s: float = 3.0) -> None:
    """``host:port`` of a running Ray head (GCS); ClusterUnreachable (a ConnectionError) when nothing answers."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise LaunchError(f"ray_address must be 'host:port' (e.g. 10.0.0.1:6379) or 'auto', got {address!r}")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise ClusterUnreachable(f"no Ray cluster answers at ray_address={address!r} ({e}); start one with "
                                 f"`ray start --head --port {port}` or omit --ray-address for a local cluster") from e


def local_cluster(address: str | None) -> bool:
    """Whether ``ray_address`` asks for a local single-machine cluster (none given, or "local")."""
    return address in (None, "", "local")


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to ``address`` (or start a local cluster); returns True when this call started Ray."""
    import ray
    if not local_cluster(address) and address != "auto":
        check_address(address)
    if ray.is_initialized():
        return False
    if local_cluster(address):
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
    return True


def check_placement(learners: int, engines: int, colocate: bool, gpus: float = 0.0, tp: int = 1,
                    engine: str = "auto") -> None:
    """LaunchError when the roles cannot be placed that way, whatever the cluster (no Ray needed)."""
    for name, v in (("learners", learners), ("engines", engines), ("engine_tp", tp)):
        if not isinstance(v, int) or v < 1:
            raise LaunchError(f"{name} must be a positive int, got {v!r}")
    if tp > 1 and (colocate or engine == "hf"):
        raise LaunchError(f"engine_tp must be 1 for {'colocated' if colocate else 'HF'} engines, got {tp}: "
                          f"tensor-parallel engines are vLLM engines placed disaggregated")
    if colocate and gpus and engines > learners:
        raise LaunchError(f"colocated GPU engines load their weights by CUDA IPC from the learner on their GPU: "
                          f"engines ({engines}) must be <= learners ({learners})")


def check_resources(learners: int, engines: int, colocate: bool, cpus: float = 1.0, gpus: float = 0.0,
                    tp: int = 1) -> None:
    """LaunchError when the cluster cannot hold the roles (see the module docstring)."""
    import ray
    have = ray.cluster_resources()
    slots = max(learners, engines) if colocate else learners + engines * tp
    for res, per in (("CPU", cpus), ("GPU", gpus)):
        if per > 0 and slots * per > have.get(res, 0.0) + 1e-9:
            raise LaunchError(f"{learners} learners + {engines} engines ({'colocated' if colocate else 'disaggregated'}"
                              f") need {slots * per:g} {res}s, the Ray cluster has {have.get(res, 0.0):g}")


Route = tuple[int, list[int]]     # (sender learner rank, the engines it sends to)


def weight_routes(learners: int, engines: int, colocate: bool, gpus: float = 0.0, loopback: bool = True
                  ) -> tuple[str, str, list[Route]]:
    """``(backend, transport, routes)`` of the weight sync (:mod:`rlhf_fast.distributed.channel`), one channel
    per route::

        CPU disaggregated   gloo  shm (one machine) / broadcast   rank 0 -> every engine
        CPU colocated       gloo  shm (one machine) / broadcast   rank e % W -> engine e   (its bundle's learner)
        GPU disaggregated   nccl  broadcast                       rank 0 -> every engine
        GPU colocated       gloo  cuda_ipc                        rank e -> engine e       (their shared GPU)

    Every learner all-gathers every tensor anyway, so each sender packs the buckets for its own engines.
    A placement :func:`check_placement` accepts."""
    if not gpus:
        routes = ([(r, list(range(r, engines, learners))) for r in range(min(learners, engines))] if colocate
                  else [(0, list(range(engines)))])
        return "gloo", "shm" if loopback else "broadcast", routes
    if not colocate:
        return "nccl", "broadcast", [(0, list(range(engines)))]
    return "gloo", "cuda_ipc", [(e, [e]) for e in range(engines)]


class LearnerRole:
    """Ray actor body of one learner rank: its address first (rank 0 hosts the rendezvous), then the rank."""

    def address(self, loopback: bool) -> tuple[str, int, int]:
        """(host, a free port for the learner group, a free port for the weight channel): this node's IP, or
        127.0.0.1 on a single-machine cluster (``loopback``)."""
        import ray
        from rlhf_fast.distributed.channel import free_port
        host = "127.0.0.1" if loopback else ray.util.get_node_ip_address()
        return host, free_port(host), free_port(host)

    def setup(self, rank: int, world: int, host: str, port: int, model_dir: str, cfg, critic_state=None,
              backend: str = "gloo") -> None:
        import torch
        from rlhf_fast.distributed.learner import Learner, init_learner_group
        torch.set_num_threads(max(1, int(os.environ.get("RLHF_FAST_LEARNER_THREADS", "1"))))
        init_learner_group(rank, world, port, host=host, backend=backend)
        self.learner = Learner(model_dir, cfg, critic_state=critic_state)

    def pid(self) -> int:
        return os.getpid()

    def call(self, method: str, *args, **kwargs):
        return getattr(self.learner, method)(*args, **kwargs)


def _options(cpus: float, gpus: float, pg, bundle: int | None, env: dict | None) -> dict:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    opts = {"num_cpus": cpus, "num_gpus": gpus, "max_concurrency": 1}
    if env:
        opts["runtime_env"] = {"env_vars": env}
    if pg is not None:
        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(placement_group=pg,
                                                                        placement_group_bundle_index=bundle)
    return opts


def start_actors(learners: int, engines: int, engine_args: dict, colocate: bool = False, cpus: float = 1.0,
                 gpus: float = 0.0, loopback: bool = True):
    """``(learner actors, engine actors, placement group or None)``; colocated pairs share bundle i."""
    import ray
    pg = None
    if colocate:
        bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
        pg = ray.util.placement_group([bundle] * max(learners, engines), strategy="PACK")
        ray.get(pg.ready())
    share = 0.5 if colocate else 1.0
    lactor = ray.remote(LearnerRole)
    lenv = LOOPBACK_ENV if loopback else None
    ls = [lactor.options(**_options(cpus * share, gpus * share, pg, i if pg else None, lenv)).remote()
          for i in range(learners)]
    es = [start_engine(engine_args, cpus * share, gpus * share, loopback, pg, i if pg else None)
          for i in range(engines)]
    return ls, es, pg


def start_engine(engine_args: dict, cpus: float = 1.0, gpus: float = 0.0, loopback: bool = True, pg=None,
                 bundle: int | None = None):
    """One engine actor (also the replacement of a dead one, then outside any placement group); ``cpus`` and
    ``gpus`` per tensor-parallel worker (``engine_args["tp"]``)."""
    import ray
    from rlhf_fast.distributed.engine import EngineWorker
    env = {**ENGINE_ENV, **(LOOPBACK_ENV if loopback else {})}
    tp = engine_args.get("tp", 1)
    threads = max(1, int(cpus)) if tp == 1 and not gpus else None    # its CPU share loads a sync (tp > 1: workers)
    return ray.remote(EngineWorker).options(**_options(cpus * tp, gpus * tp, pg, bundle, env)).remote(
        **engine_args, sync_threads=threads)
