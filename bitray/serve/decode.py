"""Bytes of a request -> the model's uint8 pixels, decoded exactly as the embedding pipeline decodes.

The ingress decodes (CPU work, next to the HTTP parsing) and sends pixels to the model replicas, which
only run the network. With an index, the size and decode choice are the index's recorded ones
(``bitray.search.query.query_decode``), so an image served online gets the vector its Parquet row holds.
"""

from __future__ import annotations

import numpy as np

from bitray.embed.decode import describe
from bitray.embed.sandbox import DecodeOptions
from bitray.images import ImageDecodeError, prepare_for_model
from bitray.serve.limits import BadRequest


def decode_request(data: bytes, options: DecodeOptions) -> np.ndarray:
    """uint8 pixels ``[h, w, 3]`` at ``options.size``; ``BadRequest`` 400 with the pipeline's error-row
    reason (not an image, truncated, over max_pixels or the decode-memory budget)."""
    try:
        pixels, _, _ = prepare_for_model(
            data,
            options.size,
            max_pixels=options.max_pixels,
            max_decode_bytes=options.max_decode_bytes,
            exact=options.exact,
        )
    except ImageDecodeError as exc:
        raise BadRequest(400, describe(exc)) from None
    return pixels
