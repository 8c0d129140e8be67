"""Reading the images out of a request: multipart `files` parts, or one raw image body.

The byte limit is enforced while the body streams in (the Content-Length header is checked
first, then every received chunk is counted), so an oversized request is never buffered whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.types import Message, Receive

from service.errors import (
    BodyTooLarge,
    InvalidMultipart,
    NoImage,
    TooManyImages,
    UnsupportedMediaType,
)
from service.imaging import CONTENT_TYPES

FIELD = "files"
_DIGITS = re.compile(r"[0-9]{1,20}")
MULTIPART = "multipart/form-data"


@dataclass(frozen=True)
class Upload:
    filename: str | None
    data: bytes

    def describe(self, index: int) -> str:
        """How errors name this image: `files[1] ('seven.png')` or `request body`."""
        if self.filename is None:
            return "request body"
        return f"{FIELD}[{index}] ({self.filename!r})"


def _too_large(limit: int) -> BodyTooLarge:
    return BodyTooLarge(f"request body is over the limit of {limit} bytes")


def _limited(receive: Receive, limit: int) -> Receive:
    received = 0

    async def counting_receive() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise _too_large(limit)
        return message

    return counting_receive


def _unsupported(media: str) -> UnsupportedMediaType:
    sent = f"Content-Type {media!r} is" if media else "a missing Content-Type is"
    return UnsupportedMediaType(
        f"{sent} not supported; send {MULTIPART} with `{FIELD}` parts, or one image body "
        f"with Content-Type one of {', '.join(sorted(CONTENT_TYPES))}"
    )


def limited(request: Request, limit: int) -> Request:
    """`request` with its body refused (413) past `limit` bytes: at once when Content-Length
    says so, else as soon as the streamed chunks pass it (every adapter reads bodies so)."""
    length = request.headers.get("content-length")
    # ASCII digits only: `²` passes str.isdigit() and then fails int() (issue 21). Anything
    # else is left to the byte count of the stream.
    if length is not None and _DIGITS.fullmatch(length) and int(length) > limit:
        raise _too_large(limit)
    return Request(request.scope, _limited(request.receive, limit))


async def read_uploads(request: Request, max_body_bytes: int, max_images: int) -> list[Upload]:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    length = request.headers.get("content-length")
    limited_request = limited(request, max_body_bytes)
    if media == MULTIPART:
        return await _read_multipart(limited_request, max_images)
    if media in CONTENT_TYPES:
        body = bytearray()
        async for chunk in limited_request.stream():
            body += chunk
        if not body:
            raise NoImage("the request body is empty; send an image")
        return [Upload(None, bytes(body))]
    if not media and length in (None, "0") and "transfer-encoding" not in request.headers:
        raise NoImage(f"the request has no body; send {MULTIPART} with `{FIELD}` parts or an image")
    raise _unsupported(media)


async def _read_multipart(request: Request, max_images: int) -> list[Upload]:
    # The parser itself, not request.form(), which turns its errors into a bare HTTP 400.
    parser = MultiPartParser(request.headers, request.stream(), max_files=max_images)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        # Starlette reports the file-count limit only through this message.
        if str(exc.message).startswith("Too many files"):
            raise TooManyImages(f"at most {max_images} images per request") from None
        raise InvalidMultipart(f"invalid multipart body: {exc.message}") from None
    try:
        parts = form.getlist(FIELD)
        if not parts:
            raise NoImage(f"the multipart body has no `{FIELD}` part")
        uploads = []
        for index, part in enumerate(parts):
            if not isinstance(part, UploadFile):
                raise InvalidMultipart(f"{FIELD}[{index}] is a text field, not a file")
            uploads.append(Upload(part.filename or "", await part.read()))
        return uploads
    finally:
        await form.close()
