"""Named failures of model loading and prompt rendering, so the layers above can map them to a status once."""


class ModelLoadError(Exception):
    """The model source is missing, malformed, or describes a model this server cannot run faithfully."""


class ChatTemplateError(ValueError):
    """The chat template is missing, or refused these messages (a bad role, a `raise_exception` call)."""


class InvalidTextError(ValueError):
    """The text cannot be tokenized: it is not valid Unicode (a lone surrogate from a JSON escape)."""


class TextTooLongError(ValueError):
    """The text holds more tokens than the caller allows; found without tokenizing all of it."""
