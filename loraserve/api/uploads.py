"""Adapter uploads: a multipart body parsed as it arrives, each file written straight into a staging directory.

The size limit is enforced on the bytes received, so an oversized upload is refused before it is held anywhere,
and weights in a pickle format are refused by name before a byte of them is written.
"""
from pathlib import Path
from typing import BinaryIO

from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header

from loraserve.adapters.errors import AdapterFormatError, AdapterTooLargeError
from loraserve.adapters.config_checks import ADAPTER_FILES, OPTIONAL_FILES, WEIGHTS_FILE
from loraserve.api.errors import InvalidRequestError

NAME_FIELD = "name"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")  # torch.load formats: loading one runs its code
MAX_NAME_BYTES = 1024
EXPECTED_FIELDS = (f"'{NAME_FIELD}' and the files {' and '.join(repr(name) for name in ADAPTER_FILES)} (and, for "
                   f"the adapter's own Medusa heads, {' and '.join(repr(name) for name in OPTIONAL_FILES)})")


class AdapterUpload:
    """The multipart parser's callbacks: the name field kept in memory, each adapter file written to disk."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.file_bytes = 0
        self.name = bytearray()
        self.received: set[str] = set()
        self.headers: dict[bytes, bytes] = {}
        self.header_field = b""
        self.header_value = b""
        self.file: BinaryIO | None = None  # None while the name field is being read
        self.complete = False  # the closing boundary arrived

    def callbacks(self) -> dict:
        return {"on_part_begin": self.on_part_begin, "on_header_field": self.on_header_field,
                "on_header_value": self.on_header_value, "on_header_end": self.on_header_end,
                "on_headers_finished": self.on_headers_finished, "on_part_data": self.on_part_data,
                "on_part_end": self.on_part_end, "on_end": self.on_end}

    def on_part_begin(self) -> None:
        self.headers = {}

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        self.headers[self.header_field.lower()] = self.header_value
        self.header_field, self.header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.headers.get(b"content-disposition"))
        field = options.get(b"name", b"").decode(errors="replace")
        filename = options.get(b"filename", b"").decode(errors="replace")
        if field.endswith(PICKLE_SUFFIXES) or filename.endswith(PICKLE_SUFFIXES):
            raise AdapterFormatError(f"pickled weights ({field or filename}) are refused: loading them could run "
                                     f"arbitrary code; upload {WEIGHTS_FILE} instead")
        if field in self.received:
            raise InvalidRequestError(f"the form has {field!r} twice", field)
        if field != NAME_FIELD and field not in ADAPTER_FILES + OPTIONAL_FILES:
            raise InvalidRequestError(f"unexpected form field {field!r}; send {EXPECTED_FIELDS}", field)
        self.received.add(field)
        self.file = None if field == NAME_FIELD else open(self.directory / field, "wb")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self.file is None:
            self.name += chunk
            if len(self.name) > MAX_NAME_BYTES:
                raise InvalidRequestError(f"the adapter name is longer than {MAX_NAME_BYTES} bytes", NAME_FIELD)
            return
        self.file_bytes += len(chunk)
        if self.file_bytes > self.max_bytes:
            raise AdapterTooLargeError(f"the adapter's files exceed this server's limit of {self.max_bytes} bytes")
        self.file.write(chunk)

    def on_part_end(self) -> None:
        self.close()

    def on_end(self) -> None:
        self.complete = True

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def adapter_name(self) -> str:
        if not self.complete:
            raise InvalidRequestError("the multipart body ended before its closing boundary")
        if NAME_FIELD not in self.received:
            raise InvalidRequestError(f"the form has no {NAME_FIELD!r} field; send {EXPECTED_FIELDS}", NAME_FIELD)
        return self.name.decode(errors="replace")


async def receive_adapter(request: Request, directory: Path, max_bytes: int) -> str:
    """Write the uploaded adapter files into `directory` as the body arrives; return the adapter's name.

    Files missing from the form are left for the registry's validation to name.
    """
    content_type, options = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data" or b"boundary" not in options:
        raise InvalidRequestError(f"send the adapter as multipart/form-data with {EXPECTED_FIELDS}")
    upload = AdapterUpload(directory, max_bytes)
    parser = MultipartParser(options[b"boundary"], upload.callbacks())
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    finally:
        upload.close()
    return upload.adapter_name()
