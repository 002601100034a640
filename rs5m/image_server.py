"""A small threaded HTTP server on 127.0.0.1 serving a folder of images, plus routes that fail in
the ways the web does. Used by the tests, ``rs5m demo`` and ``bench/download.py``::

    with ImageServer(folder) as srv:
        srv.url("tiles/Forest_1.jpg")      # http://127.0.0.1:PORT/files/tiles/Forest_1.jpg
        srv.special("404")                 # http://127.0.0.1:PORT/special/404

Special routes (``/special/<name>``):
    404, 500, 503            that HTTP status with a short HTML body
    slow?s=SECONDS           waits, then serves a tiny valid PNG (default 5 s)
    redirect-loop            302 to itself, forever
    redirect?to=PATH         302 to another path of this server
    html-as-image            an HTML page sent with ``Content-Type: image/jpeg``
    empty                    200 with an empty body (image/jpeg)
    close                    closes the connection without answering
    big?n=BYTES              n bytes of a JPEG header followed by zeros (default 4 MiB);
                             ``length=0`` sends no Content-Length
    flaky?id=X&fail=N[&file=PATH]  503 for the first N requests of id X, then the folder's
                             file PATH (default: a tiny valid PNG)

``write_problem_images(folder)`` writes the real but broken images (truncated JPEG, 1x1, a
decompression-bomb PNG, CMYK, 16-bit, EXIF-rotated, palette, RGBA) that the tests and the demo
serve through ``/files/``.
"""

from __future__ import annotations

import io
import mimetypes
import os
import posixpath
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar
from urllib.parse import parse_qs, quote, unquote, urlsplit

SPECIAL_ROUTES = (
    "404",
    "500",
    "503",
    "slow",
    "redirect-loop",
    "redirect",
    "html-as-image",
    "empty",
    "close",
    "big",
    "flaky",
)

_TINY_PNG = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f"
    b"\x15\xc4\x89\x00\x00\x00\rIDATx\x9cc\xf8\x0f\x00\x00\x01\x01\x00\x05\x18\xd8N\x00\x00\x00"
    b"\x00IEND\xaeB`\x82"
)
_HTML = b"<!doctype html><html><head><title>Not an image</title></head><body>hi</body></html>"


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    error_content_type = "text/html"

    def log_message(self, format: str, *args: object) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    def _send(self, code: int, body: bytes, ctype: str, extra: dict[str, str] | None = None):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        self.server.count_request(self.path)
        path = unquote(parts.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        if path.startswith("/files/"):
            self._serve_file(path[len("/files/") :])
        elif path.startswith("/special/"):
            self._special(path[len("/special/") :], query)
        else:
            self._send(404, b"not found", "text/plain")

    def _serve_file(self, rel: str) -> None:
        rel = posixpath.normpath(rel)
        if rel.startswith("..") or rel.startswith("/"):
            self._send(403, b"forbidden", "text/plain")
            return
        full = self.server.folder / rel
        try:
            data = full.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            self._send(404, b"not found", "text/html")
            return
        ctype = mimetypes.guess_type(full.name)[0] or "application/octet-stream"
        self._send(200, data, ctype)

    def _special(self, name: str, query: dict[str, str]) -> None:
        if name in ("404", "500", "503"):
            self._send(
                int(name), b"<html><body>error " + name.encode() + b"</body></html>", "text/html"
            )
        elif name == "slow":
            time.sleep(float(query.get("s", "5")))
            self._send(200, _TINY_PNG, "image/png")
        elif name == "redirect-loop":
            self._send(302, b"", "text/html", {"Location": "/special/redirect-loop"})
        elif name == "redirect":
            self._send(302, b"", "text/html", {"Location": query.get("to", "/")})
        elif name == "html-as-image":
            self._send(200, _HTML, "image/jpeg")
        elif name == "flaky":
            seen = self.server.hits.get(f"flaky:{query.get('id', '')}", 0)
            self.server.count_request(f"flaky:{query.get('id', '')}")
            if seen < int(query.get("fail", "1")):
                self._send(503, b"<html><body>try again</body></html>", "text/html")
            elif "file" in query:
                self._serve_file(query["file"])
            else:
                self._send(200, _TINY_PNG, "image/png")
        elif name == "empty":
            self._send(200, b"", "image/jpeg")
        elif name == "close":
            self.close_connection = True
            self.connection.close()
        elif name == "big":
            n = int(query.get("n", str(4 * 1024 * 1024)))
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            if query.get("length", "1") == "1":
                self.send_header("Content-Length", str(n))
            else:
                self.close_connection = True
            self.end_headers()
            head = b"\xff\xd8\xff\xe0"
            self.wfile.write(head)
            chunk = b"\0" * 65536
            left = n - len(head)
            while left > 0:
                try:
                    self.wfile.write(chunk[: min(left, len(chunk))])
                except OSError:
                    return
                left -= len(chunk)
        else:
            self._send(404, b"unknown special route", "text/plain")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    allow_reuse_address = True

    def __init__(self, folder: Path, verbose: bool, port: int = 0):
        super().__init__(("127.0.0.1", port), _Handler)
        self.folder = folder
        self.verbose = verbose
        self.requests = 0
        self.hits: dict[str, int] = {}
        self._lock = threading.Lock()

    def handle_error(self, request, client_address) -> None:
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, (BrokenPipeError, ConnectionResetError, TimeoutError)):
            return  # the client gave up (a timeout test): not the server's problem
        if self.verbose:
            super().handle_error(request, client_address)

    def count_request(self, path: str) -> None:
        with self._lock:
            if not path.startswith("flaky:"):
                self.requests += 1
            self.hits[path] = self.hits.get(path, 0) + 1


class ImageServer:
    """Serve ``folder`` on 127.0.0.1 in a background thread, at ``port`` or, when that is 0
    or taken, at a free port."""

    SPECIAL: ClassVar[tuple[str, ...]] = SPECIAL_ROUTES

    def __init__(self, folder: str | os.PathLike[str], verbose: bool = False, port: int = 0):
        self.folder = Path(folder).resolve()
        try:
            self._server = _Server(self.folder, verbose, port)
        except OSError:  # the preferred port is taken
            self._server = _Server(self.folder, verbose, 0)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def requests(self) -> int:
        """How many requests the server has received so far."""
        return self._server.requests

    def hits(self, url: str) -> int:
        """How many times ``url`` (as returned by :meth:`url` or :meth:`special`) was requested."""
        path = url[len(self.base_url) :] if url.startswith(self.base_url) else url
        return self._server.hits.get(path, 0)

    def url(self, relative_path: str) -> str:
        """The URL of a file of the folder (a path relative to it, '/'-separated)."""
        return f"{self.base_url}/files/{quote(relative_path)}"

    def special(self, name: str, **query: object) -> str:
        """The URL of a special route (see the module docstring)."""
        q = "&".join(f"{k}={quote(str(v))}" for k, v in query.items())
        return f"{self.base_url}/special/{name}" + (f"?{q}" if q else "")

    def start(self) -> ImageServer:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever, name="rs5m-image-server", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> ImageServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- real images that are broken in the usual ways -------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def decompression_bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A small file whose header declares ``width x height`` 8-bit grey pixels (900 MP by default):
    a decoder that trusts it allocates the full canvas. The first rows are real, the rest of the
    data stream is absent, so nothing huge is ever written here."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * (width + 1) * 16, 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", rows)
        + _png_chunk(b"IEND", b"")
    )


def write_problem_images(folder: str | os.PathLike[str], source_image: str | None = None) -> dict:
    """Write broken and unusual images into ``folder``; return ``{file name: expected outcome}``.

    Outcomes: ``"valid"`` (kept as is), ``"normalized"`` (kept, rewritten as RGB) or the validate
    stage's removal reason. ``source_image`` is a real photo to derive them from (default: the
    first bundled demo photo).
    """
    import numpy as np
    from PIL import Image

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    if source_image is None:
        photos = sorted((Path(__file__).parent / "demo_data" / "images" / "photos").glob("*.jpg"))
        source_image = str(photos[0])
    with Image.open(source_image) as im:
        photo = im.convert("RGB")
    photo.thumbnail((256, 256))
    expected: dict[str, str] = {}

    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=90)
    jpeg = buf.getvalue()
    (out / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    expected["truncated.jpg"] = "truncated"

    Image.new("RGB", (1, 1), (10, 200, 30)).save(out / "one_pixel.png")
    expected["one_pixel.png"] = "too_small"

    (out / "bomb.png").write_bytes(decompression_bomb_png())
    expected["bomb.png"] = "too_many_pixels"

    photo.convert("CMYK").save(out / "cmyk.jpg", "JPEG", quality=90)
    expected["cmyk.jpg"] = "normalized"

    grey16 = (np.asarray(photo.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(grey16).save(out / "grey16.png")
    expected["grey16.png"] = "normalized"

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    wide = photo.crop((0, 0, photo.width, photo.height * 5 // 8))  # not square: rotation shows
    wide.save(out / "exif_rotated.jpg", "JPEG", quality=90, exif=exif.tobytes())
    expected["exif_rotated.jpg"] = "normalized"

    photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(out / "palette.png")
    expected["palette.png"] = "normalized"

    rgba = photo.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(out / "alpha.png")
    expected["alpha.png"] = "normalized"

    photo.convert("L").save(out / "grey.jpg", "JPEG", quality=90)
    expected["grey.jpg"] = "valid"

    (out / "empty.jpg").write_bytes(b"")
    expected["empty.jpg"] = "empty"
    return expected
