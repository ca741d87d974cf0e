"""Offline detected once: the Hugging Face Hub (timm's pretrained weights) is probed with one
short connection; when it cannot be reached, downloads run in the hub's offline mode, so the
local cache answers at once instead of ten retries over a minute."""

from __future__ import annotations

import contextlib
import functools
import socket
import urllib.parse
import urllib.request
from collections.abc import Iterator

PROBE_TIMEOUT_S = 3.0


@functools.cache
def unreachable_hub() -> str | None:
    """``host:port`` of the hub (or of its proxy) when one connection to it fails, else None.

    Probed once per process; HF_ENDPOINT and the https_proxy / no_proxy variables apply.
    """
    from huggingface_hub import constants

    endpoint = urllib.parse.urlsplit(constants.ENDPOINT)
    target = endpoint
    proxy = urllib.request.getproxies().get(endpoint.scheme)
    if proxy and not urllib.request.proxy_bypass(endpoint.hostname or ""):
        target = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    host = target.hostname or ""
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return None
    except OSError:  # refused, no route, no DNS, timed out
        return f"{host}:{port}"


@contextlib.contextmanager
def offline_unless_reachable() -> Iterator[str | None]:
    """Within: the hub's offline mode when it cannot be reached (yields its ``host:port``),
    else nothing changes (yields None). HF_HUB_OFFLINE=1 is honoured as set."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        yield None
        return
    unreachable = unreachable_hub()
    if unreachable is None:
        yield None
        return
    constants.HF_HUB_OFFLINE = True
    try:
        yield unreachable
    finally:
        constants.HF_HUB_OFFLINE = False
