"""Where the roles run: a Ray cluster (local by default), W learner actors and E engine actors.

Resources per actor (``cpus`` each, ``gpus`` each on GPU clusters)::

    disaggregated   W learners + E engines, each its own share:     need (W + E) * cpus  CPUs
    colocated       learner i and engine i share a placement bundle: need max(W, E) * cpus CPUs  (each half of it)

Both are checked against the cluster before any actor starts (:func:`check_resources`), and an explicit
``--ray-address`` is probed with a TCP connect first (:func:`check_address`), so a typo fails in a second.
Local clusters run with ``RAY_AUTH_MODE=disabled`` (Ray 2.60 turns token auth on by default; a remote cluster
keeps whatever its head node was started with).
"""
from __future__ import annotations

import os
import socket

ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
LOOPBACK_ENV = {"GLOO_SOCKET_IFNAME": "lo"}   # gloo on 127.0.0.1 (a single-machine cluster)


def check_address(address: str, timeout_s: float = 3.0) -> None:
    """``host:port`` of a running Ray head (GCS); ConnectionError when nothing answers there."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"ray_address must be 'host:port' (e.g. 10.0.0.1:6379) or 'auto', got {address!r}")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise ConnectionError(f"no Ray cluster answers at ray_address={address!r} ({e}); start one with "
                              f"`ray start --head --port {port}` or omit --ray-address for a local cluster") from e


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to ``address`` (or start a local cluster); returns True when this call started Ray."""
    import ray
    if address not in (None, "", "local", "auto"):
        check_address(address)
    if ray.is_initialized():
        return False
    if address in (None, "", "local"):
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
    return True


def check_resources(learners: int, engines: int, colocate: bool, cpus: float = 1.0, gpus: float = 0.0) -> None:
    """ValueError when the cluster cannot hold the roles (see the module docstring)."""
    import ray
    for name, v in (("learners", learners), ("engines", engines)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    have = ray.cluster_resources()
    slots = max(learners, engines) if colocate else learners + engines
    for res, per in (("CPU", cpus), ("GPU", gpus)):
        if per > 0 and slots * per > have.get(res, 0.0) + 1e-9:
            raise ValueError(f"{learners} learners + {engines} engines ({'colocated' if colocate else 'disaggregated'}"
                             f") need {slots * per:g} {res}s, the Ray cluster has {have.get(res, 0.0):g}")


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
    """One engine actor (also the replacement of a dead one, then outside any placement group)."""
    import ray
    from rlhf_fast.distributed.engine import EngineWorker
    env = {**ENGINE_ENV, **(LOOPBACK_ENV if loopback else {})}
    return ray.remote(EngineWorker).options(**_options(cpus, gpus, pg, bundle, env)).remote(**engine_args)
