"""`loraserve serve --replicas N`: the Ray Serve application on a local Ray cluster started for it, at the address
the flags give, until SIGTERM or SIGINT. Without --adapter-dir the replicas share a temporary one."""
import dataclasses
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading

from loraserve.config import ServerConfig


def serve_replicas(config: ServerConfig, admin_key: str | None) -> None:
    try:
        import ray
        from ray import serve
    except ImportError:
        raise SystemExit("--replicas needs Ray Serve: pip install 'loraserve[ray]'") from None
    from loraserve.scaleout.app import application

    temporary = None if config.adapter_dir else tempfile.mkdtemp(prefix="loraserve-adapters-")
    port = config.port or free_port(config.host)
    config = dataclasses.replace(config, adapter_dir=config.adapter_dir or temporary, port=port)
    stop = threading.Event()
    try:
        ray.init(num_cpus=max(os.cpu_count() or 1, config.replicas + 1), include_dashboard=False,
                 logging_level=logging.WARNING)
        for signum in (signal.SIGTERM, signal.SIGINT):  # after Ray's start-up, which sets handlers of its own
            signal.signal(signum, lambda *_: stop.set())
        serve.start(http_options={"host": config.host, "port": port})
        serve.run(application(config, admin_key), name="loraserve", route_prefix="/")
        print(f"loraserve ready: http://{config.host}:{port}", flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)


def free_port(host: str) -> int:
    """A port free now, for Ray's proxy (which cannot be asked for port 0)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]
