"""Serving an app until SIGINT/SIGTERM: binds first (a bind failure is a clear error), then announces, then on
a signal closes every conversation with a message and a close frame and exits within about a second."""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import typing as tp

from aiohttp import web

from ..errors import ConfigError
from .app import AccessLogger

logger = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_S = 1.0  # for requests still running once the sessions were told to close


async def start(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Set the app up and bind it; returns the runner and the bound port (useful with port 0)."""
    runner = web.AppRunner(app, access_log_class=AccessLogger, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        hint = " (another server is using it? pick another --port)" if exc.errno == errno.EADDRINUSE else ""
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}{hint}") from exc
    server = site._server
    bound = server.sockets[0].getsockname()[1] if server is not None and server.sockets else port
    return runner, bound


async def serve_until_signal(app: web.Application, host: str, port: int,
                             on_bound: tp.Callable[[int], None] | None = None) -> None:
    runner, bound = await start(app, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if on_bound is not None:
            on_bound(bound)
        await stop.wait()
        logger.info("stopping")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await runner.cleanup()
