"""What an OIP request may make the server do, bounded before any of it is done (issue 21).

A request names its tensor's shape only inside the document that must first be parsed, so the
bounds come from the model instead: no request can usefully carry more than `max_images`
images of the model's C x H x W values. Before parsing, on the bytes:

- JSON (REST): at most `RequestBounds.json_bytes` bytes (64 KiB + 32 bytes per value of the
  largest request, after gzip/deflate inflation) and at most `json_tokens` values, counted as
  the commas and brackets that separate them (an upper bound on the values; a cheap C scan,
  made while a compressed body is inflated, so a bomb stops at its first excess chunk).
  Then `load_json` parses with a Python callback per number (so a parse in a pool thread gives
  the event loop the GIL every switch interval), refuses a number longer than 64 characters
  (no 4,300-digit integer conversions) and nesting that exhausts the recursion limit.
- Binary tensor data (REST) and raw_input_contents (gRPC): exactly the bytes the declared shape
  needs, and a shape of at most `max_images` images; gRPC messages are bounded on the wire
  (service/oip/wire.py) with the same counts as below.
- Everywhere: at most `MAX_PARAMETERS` entries per parameters map, `MAX_TENSORS` inputs or
  outputs, `MAX_TEXT` characters of an id or a string parameter, `MAX_NAME` of a name.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from service.errors import BodyTooLarge, InvalidInput
from service.text import shown

MAX_NAME = 256  # a model, tensor, output or parameter name
MAX_VERSION = 64  # a version string (a canonical version has at most 10 digits)
MAX_TEXT = 1024  # a request id, a string parameter
MAX_PARAMETERS = 64  # entries of one parameters map
MAX_TENSORS = 16  # inputs, requested outputs, raw input contents (the model takes 1, has 7)
MAX_DIMS = 16  # entries of a shape
MAX_NUMBER_CHARS = 64  # one JSON number's text ("-0.0039215688593685627" has 22)

JSON_OVERHEAD = 64 * 1024  # JSON besides the tensor's values: names, parameters, brackets
JSON_BYTES_PER_VALUE = 32  # a float32 written in full with a comma and indentation: ~26
# A well-formed header length: ASCII digits only (`²` passes str.isdigit, then fails int()).
_BYTE_COUNT = re.compile(r"[0-9]{1,12}")


@dataclass(frozen=True)
class RequestBounds:
    """The bounds of one model's requests."""

    values: int  # tensor values of the largest request: max_images x C x H x W
    rows: int  # lists of the largest request's data nested as [N][C][H][W]

    @classmethod
    def of(cls, image_shape: tuple[int, int, int], max_images: int) -> RequestBounds:
        channels, height, _ = image_shape
        rows = max_images * (1 + channels + channels * height) + 1
        return cls(max_images * math.prod(image_shape), rows)

    @property
    def json_bytes(self) -> int:
        return JSON_OVERHEAD + self.values * JSON_BYTES_PER_VALUE

    @property
    def binary_bytes(self) -> int:
        return self.values * 4

    @property
    def body_bytes(self) -> int:
        """The largest useful body, inflated: a JSON header and binary data at most."""
        return self.json_bytes + self.binary_bytes

    @property
    def json_tokens(self) -> int:
        """Commas + brackets + braces of the largest useful JSON: a comma per value, a bracket
        and a comma per row of nested data, and room for the rest of the document."""
        return self.values + 2 * self.rows + 4096


def json_tokens(data: bytes | bytearray | memoryview) -> int:
    """An upper bound on the values of a JSON text: its commas, brackets and braces (each
    value but one per container follows a comma; each container opens with a bracket)."""
    view = bytes(data) if isinstance(data, memoryview) else data
    return view.count(b",") + view.count(b"[") + view.count(b"{")


def byte_count(text: str, what: str) -> int:
    """A header's byte count: 1-12 ASCII digits (InvalidInput otherwise)."""
    stripped = text.strip(" \t")
    if _BYTE_COUNT.fullmatch(stripped) is None:
        raise InvalidInput(f"{what} must be a byte count, got {shown(text)}")
    return int(stripped)


def too_many_values(bounds: RequestBounds) -> BodyTooLarge:
    return BodyTooLarge(
        f"the JSON holds more values than the largest request for this model "
        f"({bounds.values} tensor values)"
    )


def _number(text: str) -> float:
    if len(text) > MAX_NUMBER_CHARS:
        raise InvalidInput(f"a JSON number of {len(text)} characters (at most {MAX_NUMBER_CHARS})")
    return float(text)


def _integer(text: str) -> int:
    if len(text) > MAX_NUMBER_CHARS:
        raise InvalidInput(f"a JSON number of {len(text)} characters (at most {MAX_NUMBER_CHARS})")
    return int(text)


def load_json(data: bytes, bounds: RequestBounds, framed: bool = True) -> object:
    """Parse a request's JSON once its size and value count are within `bounds`; `framed`:
    the request said where its JSON ends (Inference-Header-Content-Length)."""
    if len(data) > bounds.json_bytes:
        raise BodyTooLarge(
            f"the JSON of an inference request for this model is at most {bounds.json_bytes} "
            f"bytes, got {len(data)} (send large tensors as binary data)"
        )
    if json_tokens(data) > bounds.json_tokens:
        raise too_many_values(bounds)
    try:
        return json.loads(data, parse_float=_number, parse_int=_integer)
    except RecursionError:
        raise InvalidInput("the inference request's JSON is nested too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        # Only a JSON header followed by other bytes (or bytes that are not text) looks like
        # binary tensor data sent without its framing header; plain bad JSON gets no hint.
        binary_like = isinstance(exc, UnicodeDecodeError) or exc.msg == "Extra data"
        hint = (
            " (binary tensor data needs Inference-Header-Content-Length)"
            if binary_like and not framed
            else ""
        )
        raise InvalidInput(f"the inference request is not valid JSON: {exc}{hint}") from None
    except ValueError as exc:  # what a number conversion may still say; never a 500
        raise InvalidInput(f"the inference request has an invalid number: {exc}") from None
