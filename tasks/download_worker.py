"""The img2dataset process of the download stage, and the network safety rules it enforces.

The download stage runs ``python -m tasks.download_worker JOB.json`` in a subprocess: img2dataset
starts spawned worker processes (which re-import the main module, hence this importable module
with a ``__main__`` guard) and installs a SIGINT handler (main thread only).

Safety, enforced inside img2dataset's workers by replacing ``img2dataset.downloader.
download_image`` (img2dataset has no hook for it) with :func:`safe_download_image`:

* only ``http``/``https`` URLs (urllib would also open ``file://``, ``ftp://`` and ``data:``);
* every TCP connection, including those of redirects, is checked *after* connecting against the
  address actually reached (``getpeername``): private, loopback, link-local, reserved, multicast
  and cloud-metadata addresses are refused unless allowed by ``allow_hosts``; this also defeats
  DNS rebinding and redirects to internal addresses;
* environment proxies are ignored (a proxy would hide the peer address);
* at most ``max_redirects`` redirects; response bodies above ``max_bytes`` (by Content-Length or
  by counting) and bodies slower than ``total_timeout`` are refused.

The worker process dies with the stage process (``PR_SET_PDEATHSIG``) and img2dataset's children
exit with the worker process (:func:`exit_with_parent`), so that a download killed with
SIGKILL leaves no process writing into the partition's folder while the next run resumes it.
"""

from __future__ import annotations

import ctypes
import faulthandler
import functools
import http.client
import io
import ipaddress
import json
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from urllib.parse import urlsplit

# Addresses that are never fetched unless explicitly allowed. ``is_global`` excludes private,
# loopback, link-local, shared (CGNAT), reserved, documentation and unspecified ranges.
_METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)
ALLOWED_SCHEMES = ("http", "https")


class RefusedAddress(OSError):
    """A connection to an address the policy refuses."""


class ResponseTooLarge(OSError):
    """The response body is larger than the cap."""


@dataclass(frozen=True)
class SafetyPolicy:
    """Which hosts may be fetched, and how much of a response is read."""

    allow_hosts: tuple[str, ...] = ()  # host names, IP addresses or CIDR networks
    max_bytes: int = 32 * 1024 * 1024
    total_timeout: float = 60.0
    max_redirects: int = 5
    _names: frozenset[str] = field(init=False, repr=False, compare=False)
    _networks: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names, networks = set(), []
        for entry in self.allow_hosts:
            try:
                networks.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError:
                names.add(entry.strip().lower().rstrip("."))
        object.__setattr__(self, "_names", frozenset(names))
        object.__setattr__(self, "_networks", tuple(networks))

    def host_allowed(self, host: str | None) -> bool:
        return host is not None and host.lower().rstrip(".") in self._names

    def address_allowed(self, address: str) -> bool:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in net for net in self._networks):
            return True
        if ip in _METADATA_ADDRESSES:
            return False
        return ip.is_global and not ip.is_multicast

    def to_json(self) -> dict:
        return {
            "allow_hosts": list(self.allow_hosts),
            "max_bytes": self.max_bytes,
            "total_timeout": self.total_timeout,
            "max_redirects": self.max_redirects,
        }


def precheck_url(url: str | None, policy: SafetyPolicy, cache: dict | None = None):
    """Resolve ``url``'s host before img2dataset runs: ``None`` when it may be fetched, else
    ``(error_class, message)``. ``cache`` maps host to the result, for many URLs per host."""
    if not url:
        return "bad_url", "empty URL"
    try:
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        return "bad_url", f"unparsable URL: {exc}"
    if parts.scheme.lower() not in ALLOWED_SCHEMES:
        return "bad_url", f"scheme {parts.scheme!r} is not fetched"
    if not host:
        return "bad_url", "URL without host"
    if cache is not None and host in cache:
        return cache[host]
    result = None
    if not policy.host_allowed(host):
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            result = ("dns", f"cannot resolve {host}: {exc}")
        else:
            refused = sorted({i[4][0] for i in infos if not policy.address_allowed(i[4][0])})
            if refused:
                result = ("refused_address", f"{host} resolves to {', '.join(refused)}")
    if cache is not None:
        cache[host] = result
    return result


# -- the guarded urllib opener used inside img2dataset's workers -----------------------------------

_POLICY = SafetyPolicy()
_OPENER: urllib.request.OpenerDirector | None = None


def _guarded_create_connection(host, address, timeout, source_address=None, *args, **kwargs):
    sock = socket.create_connection(address, timeout, source_address, *args, **kwargs)
    peer = sock.getpeername()[0]
    if not (_POLICY.host_allowed(host) or _POLICY.address_allowed(peer)):
        sock.close()
        raise RefusedAddress(f"refused_address: {host} connected to {peer}")
    return sock


class _SafeHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = functools.partial(_guarded_create_connection, self.host)


class _SafeHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = functools.partial(_guarded_create_connection, self.host)


class _SafeHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_SafeHTTPConnection, req)


class _SafeHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(_SafeHTTPSConnection, req, context=self._context)


def _build_opener(policy: SafetyPolicy) -> urllib.request.OpenerDirector:
    redirect = urllib.request.HTTPRedirectHandler()
    redirect.max_redirections = policy.max_redirects
    opener = urllib.request.OpenerDirector()
    for handler in (
        _SafeHTTPHandler(),
        _SafeHTTPSHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        redirect,
        urllib.request.HTTPErrorProcessor(),
        urllib.request.UnknownHandler(),
    ):
        opener.add_handler(handler)
    return opener


def set_policy(policy: SafetyPolicy) -> None:
    global _POLICY, _OPENER
    if _OPENER is None or policy != _POLICY:
        _POLICY = policy
        _OPENER = _build_opener(policy)


def _read_capped(response, policy: SafetyPolicy) -> bytes:
    length = response.headers.get("Content-Length")
    if length is not None and length.strip().isdigit() and int(length) > policy.max_bytes:
        raise ResponseTooLarge(f"too_large: Content-Length {length} > {policy.max_bytes} bytes")
    deadline = time.monotonic() + policy.total_timeout
    buf = io.BytesIO()
    while True:
        chunk = response.read(min(1 << 16, policy.max_bytes + 1 - buf.tell()) or 1)
        if not chunk:
            return buf.getvalue()
        buf.write(chunk)
        if buf.tell() > policy.max_bytes:
            raise ResponseTooLarge(f"too_large: body over {policy.max_bytes} bytes")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out: body not received in {policy.total_timeout} s")


def safe_download_image(row, timeout, user_agent_token, disallowed_header_directives):
    """Drop-in for ``img2dataset.downloader.download_image`` (same arguments and result)."""
    from img2dataset.downloader import is_disallowed

    key, url = row
    if _OPENER is None:
        set_policy(_POLICY)
    ua = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
    if user_agent_token:
        ua += f" (compatible; {user_agent_token}; +https://github.com/rom1504/img2dataset)"
    try:
        scheme = urlsplit(url).scheme.lower()
        if scheme not in ALLOWED_SCHEMES:
            return key, None, f"bad_url: scheme {scheme!r} is not fetched"
        request = urllib.request.Request(url, data=None, headers={"User-Agent": ua})
        with _OPENER.open(request, timeout=timeout) as r:
            if disallowed_header_directives and is_disallowed(
                r.headers, user_agent_token, disallowed_header_directives
            ):
                return key, None, "Use of image disallowed by X-Robots-Tag directive"
            data = _read_capped(r, _POLICY)
        return key, io.BytesIO(data), None
    except Exception as err:
        return key, None, str(err)


def _install_patch() -> None:
    import img2dataset.downloader as dl

    dl.download_image = safe_download_image


def _make_safe_downloader_class():
    from img2dataset.downloader import Downloader

    class SafeDownloader(Downloader):
        """img2dataset's Downloader, carrying our policy into the worker processes."""

        def __init__(self, *args, policy: dict, **kwargs):
            super().__init__(*args, **kwargs)
            self.policy = policy

        def __call__(self, row):
            policy = {**self.policy, "allow_hosts": tuple(self.policy["allow_hosts"])}
            set_policy(SafetyPolicy(**policy))
            _install_patch()
            return super().__call__(row)

    SafeDownloader.__module__ = "tasks.download_worker"
    SafeDownloader.__qualname__ = "SafeDownloader"
    return SafeDownloader


def __getattr__(name: str):
    # Lazily created (img2dataset imports cv2/albumentations); pickled by reference as
    # ``tasks.download_worker.SafeDownloader`` into the spawned workers.
    if name == "SafeDownloader":
        cls = _make_safe_downloader_class()
        globals()["SafeDownloader"] = cls
        return cls
    raise AttributeError(name)


# -- process lifetime -----------------------------------------------------------------------------


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        parent = os.getppid()
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
    except (OSError, AttributeError):
        pass


def exit_with_parent(interval: float = 0.2) -> None:
    """Exit this process soon after its parent dies (a daemon thread polling ``getppid``).

    Used in img2dataset's spawned children instead of ``PR_SET_PDEATHSIG``: that signal fires
    when the *thread* that started a child exits, and multiprocessing's pool starts replacement
    workers from a helper thread that exits during ``Pool.terminate()``; killing an idle worker
    then (it holds the task queue's read lock) deadlocks ``terminate()``.
    """
    if getattr(sys, "_rs5m_exit_with_parent", False):
        return
    sys._rs5m_exit_with_parent = True
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="rs5m-exit-with-parent", daemon=True).start()


WORKER_ENV = "RS5M_DOWNLOAD_WORKER"
if os.environ.get(WORKER_ENV) == "1":
    # img2dataset never uses torch, but webdataset and albumentations import it when present
    # (2-3 s per process start on a busy machine): hide it in the worker and its children.
    sys.modules.setdefault("torch", None)  # type: ignore[arg-type]
    if multiprocessing.parent_process() is not None:
        exit_with_parent()  # a spawned img2dataset child (pool worker, logger) of the worker


def run_job(job: dict) -> None:
    """Run img2dataset with ``job["img2dataset"]`` (download() keyword arguments) under
    ``job["policy"]`` (a :class:`SafetyPolicy` as JSON)."""
    import importlib

    from tasks import download_worker  # by its importable name, also when run as __main__

    # ``img2dataset.main`` the attribute is a function; the module is in sys.modules
    i2d_main = importlib.import_module("img2dataset.main")
    i2d_main.Downloader = functools.partial(
        download_worker.SafeDownloader, policy=dict(job["policy"])
    )
    i2d_main.download(**job["img2dataset"])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m tasks.download_worker JOB.json", file=sys.stderr)
        return 2
    die_with_parent()
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1 PID: stacks to the log
    with open(argv[0]) as f:
        job = json.load(f)
    run_job(job)
    return 0


if __name__ == "__main__":
    sys.exit(main())
