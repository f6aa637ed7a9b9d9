"""Named failures of adapter handling; the API layer maps each to an HTTP status in one place."""


class AdapterError(Exception):
    """Base of everything the adapter package refuses or fails at."""


class AdapterNotFoundError(AdapterError):
    """No adapter by that name (or that version was replaced or removed and is no longer held)."""


class AdapterFormatError(AdapterError):
    """The adapter's config or weights are missing, malformed, or use a feature we do not serve."""


class AdapterTooLargeError(AdapterFormatError):
    """The adapter's rank exceeds the server's `max_rank`, so it cannot fit a slot."""


class AdapterNameError(AdapterError):
    """The name is not a safe directory name (empty, too long, odd characters, path traversal)."""


class AdapterLocationError(AdapterError):
    """A request named an adapter by a location outside the directories the server may read adapters from."""
