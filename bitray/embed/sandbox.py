"""Decoding images in a child process, so that an image which crashes its decoder costs only itself.

Pillow and its codecs are C code: an image can make them abort, crash, or allocate until the kernel (or
Ray's memory monitor) kills the process. In a decode task that kills the Ray worker, and Ray retries the
task for ever on the same images. Work items that have already killed a worker once are therefore decoded
here instead (``bitray.embed.isolation`` decides): one image at a time in a child process
(``python -m bitray.embed.sandbox``). When the child dies, the image it was decoding is the culprit: it
becomes a ``decode`` error row naming the signal, a fresh child takes the next image, and the rest of the
item is embedded as usual.

Requests and replies are pickled over the child's stdin and stdout; the child imports only Pillow, numpy
and ``bitray.images``, and gets only the environment that decoding needs (``child_environment``): never
the cloud credentials of the worker that starts it.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from bitray import testhooks
from bitray.errors import BitrayError
from bitray.images import DEFAULT_MAX_DECODE_BYTES, DEFAULT_MAX_PIXELS, ImageDecodeError, prepare_for_model

CRASH_MARKER_ENV = testhooks.DECODER_CRASH_MARKER
"""Tests only (``bitray.testhooks``): the decoder aborts its process (SIGABRT) on any image whose bytes
contain this marker, which is how the tests make a real crashing image."""


@dataclass(frozen=True)
class DecodeOptions:
    """How the pipeline decodes one image for the model (pickled to decode tasks and to the child)."""

    size: tuple[int, int]
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES
    exact: bool = False
    """``decode: exact``: full-resolution decode; else the fast decode (``bitray.images``)."""


def decode_for_model(data: bytes, options: DecodeOptions) -> tuple[np.ndarray, int, int]:
    """Encoded bytes -> (uint8 pixels at ``options.size``, stored width, height); ``ImageDecodeError``."""
    marker = testhooks.value(CRASH_MARKER_ENV)
    if marker and marker.encode() in data:
        os.abort()
    return prepare_for_model(
        data,
        options.size,
        max_pixels=options.max_pixels,
        max_decode_bytes=options.max_decode_bytes,
        exact=options.exact,
    )


CHILD_ENV = frozenset(
    {"PATH", "LD_LIBRARY_PATH", "TMPDIR", "LANG", "LANGUAGE", CRASH_MARKER_ENV}
    | {"TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "TF_CPP_MIN_LOG_LEVEL", "TF_USE_LEGACY_KERAS"}
)
CHILD_ENV_PREFIXES = ("PYTHON", "LC_", "OMP_", "MKL_", "OPENBLAS_")
"""What the decoder child inherits: where Python and its libraries are, the locale, thread counts (OpenMP,
BLAS, TensorFlow's own names: ``TF_`` as a prefix would also pass Terraform's ``TF_TOKEN_*``) and the
tests' crash marker. Everything else (AWS_*, GOOGLE_*, MLFLOW_* credentials, ...) stays with the worker."""


def child_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The subset of ``environ`` (default ``os.environ``) a decoder child gets."""
    environ = dict(os.environ if environ is None else environ)
    return {k: v for k, v in environ.items() if k in CHILD_ENV or k.startswith(CHILD_ENV_PREFIXES)}


class DecoderCrashed(BitrayError):
    """The child process died while decoding one image; the message says how (signal or exit status)."""


class SandboxDecoder:
    """``decode_for_model`` in a child process, restarted after every crash. Use as a context manager."""

    def __init__(self, options: DecodeOptions) -> None:
        self.options = options
        self.crashes = 0
        self._child: subprocess.Popen[bytes] | None = None

    def decode(self, data: bytes) -> tuple[np.ndarray, int, int]:
        child = self._child or self._start()
        try:
            pickle.dump(data, _stdin(child), protocol=pickle.HIGHEST_PROTOCOL)
            _stdin(child).flush()
            status, value = pickle.load(_stdout(child))
        except (EOFError, BrokenPipeError, pickle.UnpicklingError):
            self._child = None
            self.crashes += 1
            raise DecoderCrashed(f"the image crashed the decoder process ({_death(child)})") from None
        if status == "error":
            raise ImageDecodeError(value)
        return value

    def close(self) -> None:
        if self._child is not None:
            _stdin(self._child).close()  # the child's loop ends at end of input
            try:
                self._child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._child.kill()
                self._child.wait()
            self._child = None

    def __enter__(self) -> SandboxDecoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> subprocess.Popen[bytes]:
        child = subprocess.Popen(
            [sys.executable, "-m", "bitray.embed.sandbox"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=child_environment(),
        )
        pickle.dump(self.options, _stdin(child), protocol=pickle.HIGHEST_PROTOCOL)
        self._child = child
        return child


def _stdin(child: subprocess.Popen[bytes]) -> BinaryIO:
    assert child.stdin is not None
    return child.stdin


def _stdout(child: subprocess.Popen[bytes]) -> BinaryIO:
    assert child.stdout is not None
    return child.stdout


def _death(child: subprocess.Popen[bytes]) -> str:
    """How the child ended: 'killed by SIGABRT', 'killed by SIGKILL, e.g. out of memory', 'exit status 1'."""
    try:
        code = child.wait(timeout=10)
    except subprocess.TimeoutExpired:
        child.kill()
        code = child.wait()
    if code >= 0:
        return f"exit status {code}"
    name = signal.Signals(-code).name
    return f"killed by {name}, e.g. out of memory" if name == "SIGKILL" else f"killed by {name}"


def main() -> None:
    """The child: read the options, then decode each request until end of input; one reply per request."""
    stdin = sys.stdin.buffer
    stdout = os.fdopen(os.dup(1), "wb")  # the replies' own pipe; fd 1 becomes stderr, so that anything
    os.dup2(2, 1)  # a library prints, from Python or from C, cannot corrupt them
    sys.stdout = sys.stderr
    options: DecodeOptions = pickle.load(stdin)
    while True:
        try:
            data = pickle.load(stdin)
        except EOFError:
            return
        try:
            reply: tuple[str, object] = ("ok", decode_for_model(data, options))
        except ImageDecodeError as exc:
            reply = ("error", str(exc))
        except Exception as exc:  # the in-process path reports these too (``decoded_block``)
            reply = ("error", f"{type(exc).__name__}: {exc}")
        pickle.dump(reply, stdout, protocol=pickle.HIGHEST_PROTOCOL)
        stdout.flush()


if __name__ == "__main__":
    main()
