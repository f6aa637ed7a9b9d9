"""An engine replica of the Ray Serve application: one engine and the single server's app around it, serving the
requests the ingress forwards (`call_app`), with adapters as Ray Serve's multiplexed models, so the router sends a
request to a replica that has served its adapter before (and holds its weights), and to the least busy one
otherwise."""
import asyncio
import logging
import os
from collections.abc import AsyncIterator

from ray import serve
from ray.serve.handle import DeploymentHandle

from loraserve.api.app import create_app, exposition
from loraserve.config import ServerConfig
from loraserve.engine.async_engine import AsyncEngine
from loraserve.metrics import Metrics
from loraserve.scaleout.asgi_call import ForwardedRequest, ResponseStart, call_app
from loraserve.scaleout.metrics_board import PUSH_INTERVAL_S

logger = logging.getLogger("loraserve")

REPLICA_HEADER = b"x-loraserve-replica"  # on every response: the replica's id and process, as Ray's logs name them


def engine_replica(config: ServerConfig, admin_key: str | None) -> serve.Deployment:
    """The deployment, holding `config.max_loras` adapters per replica in the router's view (multiplexing's bound
    is fixed where the loader is declared, hence a class per configuration)."""

    class EngineReplica:
        async def __init__(self, board: DeploymentHandle) -> None:
            metrics = Metrics()
            self.engine = await asyncio.to_thread(AsyncEngine.from_config, config, metrics)
            self.app = create_app(self.engine, metrics, config, admin_key)
            self.lifespan = self.app.router.lifespan_context(self.app)
            await self.lifespan.__aenter__()  # the engine loop, as uvicorn's start-up runs it
            unique_id = serve.get_replica_context().replica_id.unique_id
            self.replica_id = f"{unique_id}:{os.getpid()}".encode()
            self.posting = asyncio.create_task(self.post_metrics(board, unique_id))

        async def post_metrics(self, board: DeploymentHandle, replica: str) -> None:
            """This replica's metrics to the board, for the ingress's /metrics, until the replica stops."""
            while True:
                try:
                    await board.put.remote(replica, exposition(self.app).decode())
                except Exception:  # the board restarting: the next post will do
                    logger.warning("could not post this replica's metrics", exc_info=True)
                await asyncio.sleep(PUSH_INTERVAL_S)

        @serve.multiplexed(max_num_models_per_replica=config.max_loras)
        async def take_adapter(self, name: str) -> str:
            """Multiplexing's load: the name as the shared store has it now (the weights are read once a request
            of it is queued, by the engine's loader)."""
            self.engine.adapters.sync(name)
            return name

        async def handle(self, request: ForwardedRequest) -> AsyncIterator[ResponseStart | bytes]:
            """The response to a forwarded request: its start, then its body as the app sends it."""
            if name := serve.get_multiplexed_model_id():
                await self.take_adapter(name)
            async for part in call_app(self.app, request):
                if isinstance(part, ResponseStart):
                    part = ResponseStart(part.status, [*part.headers, (REPLICA_HEADER, self.replica_id)])
                yield part

        def served_model_name(self) -> str:
            return self.engine.model_name

        def check_health(self) -> None:
            """Ray restarts a replica whose engine stopped for good."""
            if not self.engine.healthy:
                raise RuntimeError("the engine stopped after an internal error")

    return serve.deployment(EngineReplica, name="EngineReplica")
