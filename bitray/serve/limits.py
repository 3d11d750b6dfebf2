"""What a request may ask: its body read under a cap, its image part found, its ``k`` bounded.

Bodies are refused before they are read whole: a ``Content-Length`` over ``max_bytes`` is refused at
once, and a body without one (chunked) is read chunk by chunk and refused as soon as it passes the cap,
so a client cannot make a replica hold more than ``max_bytes`` of it. Every refusal is a ``BadRequest``
whose ``reason`` is one line, in the words the pipeline's error rows use.
"""

from __future__ import annotations

import email.parser
import email.policy
from typing import Protocol

from bitray.errors import BitrayError

IMAGE_FIELD = "image"
"""The multipart form field holding the image (``curl -F image=@photo.jpg``)."""


class BadRequest(BitrayError):
    """A request the API refuses: ``status`` (4xx) and a one-line reason for the JSON body."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


class StreamingRequest(Protocol):
    headers: dict

    def stream(self):  # noqa: ANN201 - an async iterator of bytes (Starlette's Request.stream)
        ...


def too_large(size: str, max_bytes: int) -> BadRequest:
    """As the pipeline's read stage words an object over ``max_bytes`` (``storage.ObjectTooLarge``)."""
    return BadRequest(
        413, f"ObjectTooLarge: request body is {size} bytes, over the cap of {max_bytes:,} (max_bytes)"
    )


async def read_body(request: StreamingRequest, max_bytes: int) -> bytes:
    """The request body, at most ``max_bytes`` of it; ``BadRequest`` 413 past that, 400 when empty."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest(400, f"Content-Length {declared[:20]!r} is not a number of bytes")
        if int(declared) > max_bytes:
            raise too_large(f"{int(declared):,}", max_bytes)
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > max_bytes:
            raise too_large(f"over {max_bytes:,}", max_bytes)
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body:
        raise BadRequest(400, "ImageDecodeError: empty file (0 bytes); send the image as the request body "
                              f"or as the multipart field {IMAGE_FIELD!r}")  # fmt: skip
    return body


def image_bytes(body: bytes, content_type: str | None) -> bytes:
    """The image in a body: the ``image`` field of a multipart form, else the body itself."""
    if not content_type or not content_type.lower().startswith("multipart/form-data"):
        return body
    header = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1", "replace")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(header + body)
    if not message.is_multipart():
        raise BadRequest(400, "multipart body without parts; send the image as the field "
                              f"{IMAGE_FIELD!r} (curl -F {IMAGE_FIELD}=@photo.jpg)")  # fmt: skip
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == IMAGE_FIELD:
            return part.get_payload(decode=True) or b""
    raise BadRequest(
        400, f"multipart body has no field {IMAGE_FIELD!r}; send curl -F {IMAGE_FIELD}=@photo.jpg"
    )


def capped_k(value: str | int | None, default: int, k_max: int) -> int:
    """``k`` from a query string or JSON: an integer >= 1, capped to ``k_max``."""
    if value is None or value == "":
        return min(default, k_max)
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise BadRequest(400, f"k={str(value)[:20]!r} is not an integer; ask for k=1 to {k_max}") from None
    if k < 1:
        raise BadRequest(400, f"k={k}: ask for at least one result (k=1 to {k_max})")
    return min(k, k_max)
