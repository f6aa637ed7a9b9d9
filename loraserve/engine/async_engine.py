"""Drives the engine from asyncio: requests arrive and leave while a dedicated thread steps the model.

The step thread runs steps back to back for as long as there is work, and hands each step's outputs to the event
loop, which streams them to clients while the next step computes (the kernels release the GIL). Waiting for the
event loop between steps left the step thread idle a third of the time at one request. Only the step thread
touches the engine's scheduler state: `submit` and `abort` queue their changes, and it applies them between
steps. One thread for every step also keeps the math library's thread pool bound to a single caller.
"""
import asyncio
import logging
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import dataclass

import torch

from loraserve.adapters.records import AdapterRef
from loraserve.config import ServerConfig
from loraserve.engine.engine import LLMEngine
from loraserve.engine.errors import EngineDeadError, QueueFullError, RequestValidationError, ShuttingDownError
from loraserve.engine.grammar import GrammarSpec
from loraserve.engine.outputs import RequestOutput
from loraserve.engine.sampling_params import SamplingParams
from loraserve.metrics import Metrics
from loraserve.model.loader import load_model

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int


OutputQueue = asyncio.Queue[tuple[int, "RequestOutput | Exception"]]


class RequestStream:
    """The outputs of one request, as an async iterator; the last one has `finished` set, and a failure is raised.

    Several requests can share one queue (the requests behind one HTTP request): each item comes tagged with its
    stream's `index`, and whoever reads the queue, not the streams, tells them apart.
    """

    def __init__(self, request_id: str, num_prompt_tokens: int, on_abort: Callable[[str], None],
                 outputs: OutputQueue | None = None, index: int = 0) -> None:
        self.request_id = request_id
        self.num_prompt_tokens = num_prompt_tokens
        self.index = index
        self.finished = False  # the engine sent its last output (or an error): nothing left to abort
        self._outputs: OutputQueue = outputs if outputs is not None else asyncio.Queue()
        self._read_all = False
        self._on_abort = on_abort

    def put(self, item: "RequestOutput | Exception") -> None:
        self.finished = isinstance(item, Exception) or item.finished
        self._outputs.put_nowait((self.index, item))

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        """For a stream with a queue of its own."""
        if self._read_all:
            raise StopAsyncIteration
        _, item = await self._outputs.get()
        self._read_all = isinstance(item, Exception) or item.finished
        if isinstance(item, Exception):
            raise item
        return item

    def abort(self) -> None:
        """Stop the request if it still runs (the client left); safe to call more than once."""
        if not self.finished:
            self.finished = True
            self._on_abort(self.request_id)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str) -> torch.dtype | None:
    """None for "auto": the loader chooses from the device and the weights' format."""
    return None if name == "auto" else getattr(torch, name)


def new_step_thread() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraserve-step")


def build_engine(config: ServerConfig, metrics: Metrics) -> tuple[LLMEngine, str]:
    """The engine and the model's own name."""
    device = resolve_device(config.device)
    loaded = load_model(config.model, device, resolve_dtype(config.dtype), config.quantization)
    dtype = next(loaded.model.parameters()).dtype
    draft = load_model(config.draft_model, device, dtype, config.quantization) if config.draft_model else None
    return LLMEngine(loaded, config, metrics, draft), loaded.name


class AsyncEngine:
    """The engine as the HTTP layer sees it: submit a request, iterate its outputs, abort it."""

    def __init__(self, engine: LLMEngine, model_name: str, max_queue: int,
                 step_thread: ThreadPoolExecutor | None = None) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = model_name
        self.max_model_len = engine.max_model_len
        self.device = str(engine.runner.device)
        self.dtype = str(engine.runner.dtype).removeprefix("torch.")
        self.max_queue = max_queue
        self.adapters = engine.adapters
        self.adapter_locations = engine.adapter_locations
        self.healthy = True
        self.draining = False  # set once shutdown begins: new requests are refused
        self.on_dead: Callable[[], None] | None = None  # called once if the engine stops for good
        self._streams: dict[str, RequestStream] = {}
        self._pending_adds: list[tuple[str, list[int], SamplingParams, AdapterRef | None]] = []
        self._pending_aborts: list[str] = []
        self._pending_lock = threading.Lock()  # the event loop queues changes, the step thread takes them
        self._has_work = threading.Event()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._driver: Future | None = None
        self._step_thread = step_thread or new_step_thread()

    @classmethod
    def from_config(cls, config: ServerConfig, metrics: Metrics) -> "AsyncEngine":
        """Load and build on the thread that will run the steps: every OpenMP team that has run tensor work
        keeps threads of its own, and on a 2-core CPU a second team (the main thread's, from loading) made
        each decode step 1.7x slower."""
        step_thread = new_step_thread()
        engine, name = step_thread.submit(build_engine, config, metrics).result()
        return cls(engine, config.served_model_name or name, config.max_queue, step_thread)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._driver = self._step_thread.submit(self._drive)

    async def drain(self, timeout: float) -> None:
        """Refuse new requests, give running ones `timeout` seconds to finish, then end the rest with an error
        their streams report, so each client sees a clean end rather than a cut connection."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._streams and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self._streams:
            logger.warning("shutdown: aborting %d requests still running after %.1f s", len(self._streams), timeout)
        for request_id, stream in list(self._streams.items()):
            stream.put(ShuttingDownError("the server is shutting down; the request was stopped"))
            self._abort(request_id)

    async def shutdown(self) -> None:
        self._stopping = True
        self._has_work.set()
        self.engine.notify()
        if self._driver is not None:
            await asyncio.gather(asyncio.wrap_future(self._driver), return_exceptions=True)  # its step ends first
        self._step_thread.shutdown(wait=True)
        self._fail_all(EngineDeadError("the server is shutting down"))

    async def prepare_grammar(self, spec: GrammarSpec | None) -> None:
        """Compile (and cache) a request's grammar, if it has one, in a worker thread before it is submitted, so
        the step thread only copies it; raises GrammarError, a RequestValidationError, when it cannot compile."""
        if spec is not None:
            await asyncio.to_thread(self.engine.grammars.compile, spec)

    def submit(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
               adapter: AdapterRef | None = None, outputs: OutputQueue | None = None, index: int = 0
               ) -> RequestStream:
        """Queue a request; raises RequestValidationError, QueueFullError or EngineDeadError at once. Its outputs
        go to `outputs`, tagged with `index`, when given (see RequestStream)."""
        if not self.healthy:
            raise EngineDeadError("the engine stopped after an internal error")
        if self.draining:
            raise ShuttingDownError("the server is shutting down; send the request to another replica")
        self.engine.validate(prompt_token_ids, params, adapter)
        if len(self.engine.scheduler.waiting) + len(self._pending_adds) >= self.max_queue:
            raise QueueFullError(f"{self.max_queue} requests are already waiting; try again later")
        request_id = request_id or uuid.uuid4().hex
        if adapter is not None:
            self.adapters.pin(adapter)  # now, not when the loop adds it: the caller's own pin may go first
        stream = RequestStream(request_id, len(prompt_token_ids), self._abort, outputs, index)
        self._streams[request_id] = stream
        with self._pending_lock:
            self._pending_adds.append((request_id, list(prompt_token_ids), params, adapter))
        self._has_work.set()
        self.engine.notify()
        return stream

    def check_capacity(self, count: int) -> None:
        """Refuse, before any is submitted, a batch of `count` requests that can never be queued (a
        RequestValidationError: retrying cannot help) or that does not fit the queue now (QueueFullError)."""
        if count > self.max_queue:
            raise RequestValidationError(f"this request asks for {count} completions (prompts times n); this "
                                         f"server queues at most {self.max_queue} at once: split it")
        waiting = len(self.engine.scheduler.waiting) + len(self._pending_adds)
        if waiting + count > self.max_queue:
            raise QueueFullError(f"{waiting} of {self.max_queue} queue places are taken and this request needs "
                                 f"{count}; try again later")

    def stats(self) -> EngineStats:
        block_manager = self.engine.block_manager
        return EngineStats(len(self.engine.scheduler.running),
                           len(self.engine.scheduler.waiting) + len(self._pending_adds),
                           block_manager.num_free_blocks, block_manager.num_blocks)

    def _abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None:
            with self._pending_lock:
                self._pending_aborts.append(request_id)
            self._has_work.set()
            self.engine.notify()

    def _drive(self) -> None:
        """The step thread's loop, until shutdown or a failure no request can be blamed for."""
        while not self._stopping:
            self._has_work.clear()
            try:
                self._apply_pending()
                if not self.engine.has_unfinished_requests():
                    self._has_work.wait()
                    continue
                outputs = self.engine.step()
            except Exception as error:  # the step could not isolate it: the device or the model is broken
                logger.exception("engine step failed beyond any one request; the engine stops")
                self._loop.call_soon_threadsafe(self._die, error)
                return
            if outputs:
                self._loop.call_soon_threadsafe(self._deliver, outputs)

    def _apply_pending(self) -> None:
        """On the step thread: the requests and aborts queued since the last step."""
        with self._pending_lock:
            adds, self._pending_adds = self._pending_adds, []
            aborts, self._pending_aborts = self._pending_aborts, []
        refused: list[tuple[str, Exception]] = []
        for request_id, prompt, params, adapter in adds:
            try:
                self.engine.add_request(request_id, prompt, params, adapter)
            except Exception as error:  # reported to its own request, never to the loop
                if adapter is not None:
                    self.adapters.unpin(adapter)
                refused.append((request_id, error))
        for request_id in aborts:
            self.engine.abort_request(request_id)
        if refused:
            self._loop.call_soon_threadsafe(self._refuse, refused)

    def _refuse(self, refused: list[tuple[str, Exception]]) -> None:
        for request_id, error in refused:
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                stream.put(error)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """On the event loop: each output to its request's stream."""
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                stream.put(output.error if output.error is not None else output)
            if output.finished:
                self._streams.pop(output.request_id, None)

    def _die(self, error: Exception) -> None:
        self.healthy = False
        self._fail_all(EngineDeadError(f"the engine failed ({type(error).__name__}); the server restarts"))
        if self.on_dead is not None:
            self.on_dead()

    def _fail_all(self, error: Exception) -> None:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.put(error)
