"""Request checks for the Serve apps, without Serve: uploads, limits, API key, body size.

Every refusal is a `RequestError` with an HTTP status and a message a clinician's client can
show; the ingress turns it into a JSON response. Messages never quote what was uploaded or
typed (metadata values, note text), so they are safe to log.
"""

from __future__ import annotations

import hmac
import io
import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

# Formats the image processors decode the same way everywhere; anything else (GIF, PSD, SVG,
# ...) is refused before it is decoded.
ACCEPTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP")
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers around an uploaded file


class RequestError(Exception):
    """A request the service refuses: `status` (4xx) and a message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message

    def __reduce__(self):  # keeps status and message when Ray carries it between processes
        return (RequestError, (self.status, self.message))


def check_upload_size(size: int, max_bytes: int) -> None:
    if size == 0:
        raise RequestError(422, "the upload is empty: send a JPEG, PNG or WebP image")
    if size > max_bytes:
        raise RequestError(413, f"the upload is {size} bytes; the limit is {max_bytes} bytes")


def decode_upload(data: bytes, max_bytes: int, max_pixels: int) -> Image.Image:
    """An uploaded image as RGB, or a RequestError: too large (413), not an accepted image (415),
    more pixels than `max_pixels` (422, a decompression bomb), or corrupt / truncated (422).

    The pixel count is read from the header and checked before any pixel is decoded, so a small
    file that would expand to gigabytes is refused at the cost of reading its header.
    """
    check_upload_size(len(data), max_bytes)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise RequestError(422, f"the image has more pixels than the limit of {max_pixels}") from None
        except (UnidentifiedImageError, OSError, ValueError):
            raise RequestError(415, f"the upload is not an image this service reads ({', '.join(ACCEPTED_FORMATS)})") from None
    if image.format not in ACCEPTED_FORMATS:
        raise RequestError(415, f"{image.format} images are not accepted; send {', '.join(ACCEPTED_FORMATS)}")
    width, height = image.size
    if width < 1 or height < 1:
        raise RequestError(422, "the image has no pixels")
    if width * height > max_pixels:
        raise RequestError(422, f"the image is {width} x {height} = {width * height} pixels; the limit is {max_pixels}")
    try:
        image.load()
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError):
        raise RequestError(422, "the image data is truncated or corrupt") from None
    finally:
        image.close()


def check_k(k: int, max_k: int) -> int:
    if not 1 <= k <= max_k:
        raise RequestError(422, f"k must be between 1 and {max_k}, got {k}")
    return k


def check_count(count: int, max_images: int) -> int:
    if not 1 <= count <= max_images:
        raise RequestError(422, f"count must be between 1 and {max_images}, got {count}")
    return count


def check_text(text: str, max_chars: int) -> str:
    text = text.strip()
    if not text:
        raise RequestError(422, "the note text is empty")
    if len(text) > max_chars:
        raise RequestError(413, f"the note text is {len(text)} characters; the limit is {max_chars}")
    return text


def check_api_key(expected: str | None, given: str | None) -> None:
    """No key configured: open. Otherwise the `X-API-Key` header must match (constant-time compare)."""
    if not expected:
        return
    if not given or not hmac.compare_digest(given.encode(), expected.encode()):
        raise RequestError(401, "missing or wrong X-API-Key header")


def resolve_api_key(settings: Any, environ: Mapping[str, str]) -> tuple[str | None, list[str]]:
    """(the key requests must send, warnings to log) from a ServeConfig, read where the key is checked:
    the `api_key_env` variable, else the `api_key_file` file, else `api_key` from the config (warned
    about: a config travels in Ray's state). No key: a ValueError, unless `allow_anonymous` (warned)."""
    if environ.get(settings.api_key_env, "").strip():
        return environ[settings.api_key_env].strip(), []
    if settings.api_key_file:
        try:
            key = Path(settings.api_key_file).expanduser().read_text().strip()
        except OSError as exc:
            raise ValueError(
                f"serve.api_key_file {settings.api_key_file!r} cannot be read on this node: {exc.strerror}"
            ) from None
        if not key:
            raise ValueError(f"serve.api_key_file {settings.api_key_file!r} is empty")
        return key, []
    if settings.api_key:
        return settings.api_key, [
            "serve.api_key is written in the config, which travels in Ray's state and files: "
            f"set the {settings.api_key_env} environment variable or serve.api_key_file instead"
        ]
    if settings.allow_anonymous:
        return None, [
            "serving without an API key (serve.allow_anonymous): anyone who reaches the port can use every "
            f"endpoint; set {settings.api_key_env} or serve.api_key_file"
        ]
    raise ValueError(
        f"no API key: set the {settings.api_key_env} environment variable on the Ingress, or serve.api_key_file "
        "to a secret file on its node (or serve.allow_anonymous=true for a trial on this machine)"
    )


class BodyLimit:
    """ASGI middleware: refuse request bodies over `max_bytes` with 413 before the app reads them.

    A declared Content-Length over the limit is refused without reading a byte; a body without
    one (chunked) is counted as it arrives and cut off at the limit.
    """

    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > self.max_bytes
            except ValueError:
                return await _send_error(send, 400, "the Content-Length header is not a number")
            if too_large:
                return await _send_error(
                    send, 413, f"the request body is {int(declared)} bytes; the limit is {self.max_bytes} bytes"
                )
        received = 0
        started = False

        async def counted_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge
            return message

        async def tracked_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _BodyTooLarge:
            if not started:
                await _send_error(send, 413, f"the request body is over the limit of {self.max_bytes} bytes")


class _BodyTooLarge(Exception):
    pass


async def _send_error(send: Any, status: int, message: str) -> None:
    body = json.dumps({"detail": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
