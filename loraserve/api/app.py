"""The FastAPI application: both APIs' routes, the adapter routes, the error handlers, and the operational
endpoints."""
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from loraserve.api import adapter_routes, lorax_routes, openai_routes
from loraserve.api.common_schema import MAX_STOP_SEQUENCES
from loraserve.api.body_limits import BodyLimits
from loraserve.api.errors import error_responder, install_error_handlers
from loraserve.api.generation import engine_of
from loraserve.api.openapi import HealthStatus, describe_errors_only
from loraserve.config import ServerConfig
from loraserve.engine.async_engine import AsyncEngine
from loraserve.metrics import Metrics

router = APIRouter()


def package_version() -> str:
    try:
        return version("loraserve")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


@router.get("/health", response_model=HealthStatus, responses={
    503: {"model": HealthStatus, "description": "The engine stopped, or the server is shutting down."}})
async def health(engine: AsyncEngine = Depends(engine_of)) -> JSONResponse:
    """200 while the engine loop runs; 503 once it died, so an orchestrator restarts the server, or while it
    shuts down, so a load balancer stops sending it requests."""
    if not engine.healthy:
        return JSONResponse({"status": "engine dead"}, status_code=503)
    if engine.draining:
        return JSONResponse({"status": "shutting down"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/info")
async def info(request: Request, engine: AsyncEngine = Depends(engine_of)) -> dict:
    """What LoRAX's /info reports, for clients and dashboards that read it."""
    config: ServerConfig = request.app.state.config
    stats = engine.stats()
    return {
        "model_id": engine.model_name, "model_sha": None, "model_dtype": engine.dtype,
        "model_device_type": engine.device, "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": config.max_num_seqs + config.max_queue, "max_best_of": 1,
        "max_stop_sequences": MAX_STOP_SEQUENCES, "max_input_length": engine.max_model_len - 1,
        "max_total_tokens": engine.max_model_len,
        "max_batch_total_tokens": stats.num_total_blocks * config.block_size,
        "max_batch_prefill_tokens": config.max_num_batched_tokens, "block_size": config.block_size,
        "speculate": config.spec_tokens,
        "version": package_version(), "sha": None, "docker_label": None,
        # Not in LoRAX's /info: what adapters hold right now, for operators and tests.
        "adapter_slots_in_use": engine.adapters.slots_in_use(), "adapter_references": engine.adapters.num_references(),
        "adapter_pins": engine.adapters.num_pins(),
    }


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics_text(request: Request) -> Response:
    return Response(exposition(request.app), media_type=CONTENT_TYPE_PLAIN_0_0_4)


def exposition(app: FastAPI) -> bytes:
    """Prometheus text. The scheduler and adapter gauges are set here, at scrape time, and nowhere else: one
    definition of each (waiting includes requests not yet handed to the scheduler), nothing on the step path."""
    engine: AsyncEngine = app.state.engine
    metrics: Metrics = app.state.metrics
    stats = engine.stats()
    metrics.running.set(stats.num_running)
    metrics.waiting.set(stats.num_waiting)
    metrics.kv_cache_usage.set(1.0 - stats.num_free_blocks / stats.num_total_blocks)
    metrics.adapter_slots_in_use.set(engine.adapters.slots_in_use())
    metrics.adapter_slots_held.set(engine.adapters.slots_held())
    metrics.waiting_for_adapter.set(engine.adapters.waiting_for_load())
    metrics.count_adapter_tiers(record.tier for record in engine.adapters.records())
    metrics.adapter_activity(*engine.adapters.activity(), app.state.config.max_loras)
    return metrics.exposition()


def create_app(engine: AsyncEngine, metrics: Metrics, config: ServerConfig, admin_key: str | None) -> FastAPI:
    """The app around a built engine; the engine loop runs while the app serves. Without an admin key, anyone
    who reaches the server may change its adapters."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        try:
            yield
        finally:
            await engine.shutdown()

    app = FastAPI(title="loraserve", version=package_version(), lifespan=lifespan)
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.config = config
    app.state.admin_key = admin_key
    install_error_handlers(app, metrics)
    describe_errors_only(app)
    app.add_middleware(BodyLimits, routes=app.router.routes, max_bytes=config.max_request_bytes,
                       upload_path=adapter_routes.UPLOAD_PATH, max_upload_bytes=config.max_adapter_bytes,
                       respond=error_responder(metrics))
    for routes in (router, openai_routes.router, lorax_routes.router, adapter_routes.router,
                   adapter_routes.admin_router):
        app.include_router(routes)
    return app
