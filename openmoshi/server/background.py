"""Run a server in a background thread of this process (tests, notebooks, benchmarks)."""

from __future__ import annotations

import asyncio
import threading

import torch

from ..bundle import load_model
from ..cli.common import default_threads, usable_cores
from .app import create_app, engine_for
from .engine import STANDING_QUEUE_S
from .limits import SessionLimits
from .runner import start


class RunningServer:
    """`with RunningServer(model) as srv:` serves on 127.0.0.1 at a free port (`srv.url`, `srv.http`)."""

    def __init__(self, model_folder, max_sessions: int = 4, token: str | None = None,
                 max_backlog_frames: int | None = 12, host: str = "127.0.0.1", limits: SessionLimits | None = None,
                 wait_ready: bool = True, threads: int | None = 0,
                 standing_queue_s: float | None = STANDING_QUEUE_S, tts_options=None) -> None:
        # threads: torch's intra-op threads while serving (0 = as `openmoshi serve` picks them, None = leave
        # them); restored on exit. Torch's default of one per core is 25x slower on a busy 2-core machine.
        self._threads_before = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads or default_threads(usable_cores(), "serve"))
        self.bundle = load_model(model_folder)
        # max_backlog_frames / standing_queue_s = None: a late session's input waits instead of being dropped
        # (for exact comparisons on a loaded machine; a real server drops so that latency stays bounded).
        # stt and tts models get their own engines (ASR / TTS websockets instead of /api/chat).
        self.engine = engine_for(self.bundle, max_sessions,
                                 max_backlog_frames=1 << 30 if max_backlog_frames is None else max_backlog_frames,
                                 standing_queue_s=standing_queue_s, tts_options=tts_options)
        self.app = create_app(self.engine, token=token, limits=limits)
        self.loop = asyncio.new_event_loop()
        self.host = host
        self.wait_ready = wait_ready  # __enter__ returns once warmed up (/health says "ok")
        self.port = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.runner, self.port = self.loop.run_until_complete(start(self.app, self.host, 0))
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.runner.cleanup())
        self.loop.close()

    def __enter__(self) -> RunningServer:
        self._thread.start()
        if not self._ready.wait(60):
            raise RuntimeError("server did not start")
        if self.wait_ready:
            asyncio.run_coroutine_threadsafe(asyncio.wait_for(self.engine.ready.wait(), 120), self.loop).result()
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)
        torch.set_num_threads(self._threads_before)

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}/api/chat"

    @property
    def ws_base(self) -> str:
        """ws://host:port, for the DSM endpoints (/api/asr-streaming, /api/tts_streaming)."""
        return f"ws://{self.host}:{self.port}"

    @property
    def http(self) -> str:
        return f"http://{self.host}:{self.port}"
