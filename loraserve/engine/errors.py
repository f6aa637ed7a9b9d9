"""Named failures of the engine; the API layer maps each to an HTTP status in one place."""


class EngineError(Exception):
    """Base of everything the engine refuses or fails at."""


class RequestValidationError(EngineError):
    """The request cannot be served as asked (prompt too long, max_tokens beyond the context, ...)."""


class QueueFullError(EngineError):
    """More requests are waiting than `--max-queue` allows."""


class EngineDeadError(EngineError):
    """The engine loop stopped on an internal error; no request can be served."""


class ShuttingDownError(EngineError):
    """The server is stopping: it takes no new requests, and ends those still running past the grace period."""


class RequestFailedError(EngineError):
    """The engine failed while computing this request; it was ended alone, and the others go on."""
