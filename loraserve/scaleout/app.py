"""The Ray Serve application: `config.replicas` engine replicas behind one ingress, all on one shared adapter
directory. `serve run loraserve.scaleout.app:build model=embedded replicas=2` runs it on a Ray cluster (each
argument is a `loraserve serve` flag without its dashes); `loraserve serve --replicas N` runs it on a local one."""
import dataclasses

from ray.serve import Application

from loraserve.config import ServerConfig
from loraserve.scaleout.ingress import Ingress
from loraserve.scaleout.metrics_board import MetricsBoard
from loraserve.scaleout.replica import engine_replica


def application(config: ServerConfig, admin_key: str | None) -> Application:
    """One CPU of Ray's accounting per replica (Ray gives its actor as many OpenMP threads) and, with --device
    cuda, one GPU; none for the ingress, which only forwards. A replica takes as many requests as its engine runs
    and queues (its engine refuses the rest with 429), so multiplexing keeps an adapter's requests on the replica
    that has it rather than spilling them at Ray's default of 5."""
    assert config.adapter_dir is not None, "the replicas need one adapter directory they all reach"
    config = dataclasses.replace(config, shared_adapter_dir=True)
    capacity = config.max_num_seqs + config.max_queue
    resources = {"num_cpus": 1, "num_gpus": 1 if config.device == "cuda" else 0}
    replicas = engine_replica(config, admin_key).options(num_replicas=config.replicas, max_ongoing_requests=capacity,
                                                         ray_actor_options=resources)
    board = MetricsBoard.bind()
    return Ingress.options(max_ongoing_requests=capacity * config.replicas, ray_actor_options={"num_cpus": 0}
                           ).bind(replicas.bind(board), board, config)


def build(args: dict[str, str]) -> Application:
    """`serve run`'s entry point; the admin key comes from the environment, as for `loraserve serve`."""
    from loraserve.api.auth import admin_key_from_environment
    from loraserve.cli import build_parser, config_from

    flags = [part for key, value in args.items() for part in (f"--{key.replace('_', '-')}", value)]
    return application(config_from(build_parser().parse_args(["serve", *flags])), admin_key_from_environment())
