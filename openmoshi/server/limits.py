"""Per-session limits of the chat server: what one client may cost the others, and when it is closed."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields

from ..errors import ConfigError


@dataclass(frozen=True)
class SessionLimits:
    """Bounds on one conversation. Defaults fit Kyutai's clients (one ~100-byte Ogg page per 20-80 ms)."""

    max_message_bytes: int = 64 * 1024  # a websocket message; a 20 ms Opus page is ~100 bytes
    input_rate: float = 2.0  # seconds of user audio accepted per wall-clock second, on average
    input_burst_s: float = 10.0  # ... with this much allowed at once (reconnects, network hiccups)
    idle_timeout_s: float = 20.0  # no audio in, no answer out for this long: the session is closed, slot freed
    outbox_frames: int = 25  # Moshi's frames (80 ms) waiting for a slow reader; older ones are dropped
    send_stall_s: float = 10.0  # a client that reads nothing for this long is disconnected
    send_buffer_bytes: int = 32 * 1024  # output written before waiting for the socket to drain
    close_timeout_s: float = 1.0  # how long a close waits for the client's close frame
    warmup_wait_s: float = 120.0  # a client connecting during warm-up waits this long for its handshake

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ConfigError(f"session limit {f.name} must be a positive finite number, got {value!r}")
        if self.max_message_bytes < 1024:
            raise ConfigError(f"session limit max_message_bytes must be at least 1024, got {self.max_message_bytes}")


class InputBudget:
    """Token bucket of user audio seconds: refills at `rate` per second up to `burst`."""

    def __init__(self, rate: float, burst: float, clock=time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._level = burst
        self._last = clock()

    def available(self) -> float:
        """Seconds of audio that may be accepted now."""
        now = self._clock()
        self._level = min(self.burst, self._level + (now - self._last) * self.rate)
        self._last = now
        return self._level

    def spend(self, seconds: float) -> None:
        self.available()
        self._level -= seconds
