"""Streaming Ogg-Opus for the websocket protocol (mono, 24 kHz by default), built on sphn's Opus codec.

The encoder turns float32 pcm into Ogg pages ready to send. The decoder accepts byte chunks split anywhere,
cuts them into whole Ogg pages itself (capture pattern, version, CRC) and hands sphn one verified page at a
time. Doing the framing here gives three things sphn alone does not: bad bytes are reported in the message that
carried them, the stream recovers at the next page instead of staying broken, and sphn's per-call output limit
(5 s of audio) is never hit by a large message.

Measured behaviour of sphn 0.2's codec: packets are 960 samples (40 ms at 24 kHz), one packet per page, the
first output also carries the OpusHead and OpusTags pages, and decoded audio lags the input by about 156
samples at 24 kHz (the Opus look-ahead; sphn does not trim it). The OpusHead pre-skip that sphn writes says
3840 samples at 48 kHz (80 ms), so players that honour it (libsndfile, browsers) drop about 73 ms of real audio
at the start of a stream; the official clients live with the same.
"""

from __future__ import annotations

import logging
import zlib

import numpy as np
import sphn
import torch

from openmoshi.errors import AudioError, ConfigError, ProtocolError

logger = logging.getLogger(__name__)

OPUS_SAMPLE_RATES = (8000, 12000, 16000, 24000, 48000)
PACKET_SAMPLES = 960  # sphn encodes fixed 960-sample packets at every rate

_CAPTURE = b"OggS"
_HEADER_SIZE = 27  # fixed part of an Ogg page header, before the segment table
_BIT_REVERSED = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def ogg_crc(page: bytes) -> int:
    """Ogg's CRC-32 (polynomial 0x04C11DB7, not reflected, init 0) of `page` with its CRC field zeroed.

    zlib only has the reflected variant; reflecting every input byte and the result turns one into the other,
    and passing 0xFFFFFFFF as the start value cancels zlib's initial and final inversions.
    """
    reflected = zlib.crc32(page.translate(_BIT_REVERSED), 0xFFFFFFFF) ^ 0xFFFFFFFF
    return int(f"{reflected:032b}"[::-1], 2)


def _check_rate(sample_rate: int) -> None:
    if sample_rate not in OPUS_SAMPLE_RATES:
        raise ConfigError(f"Opus supports sample rates {OPUS_SAMPLE_RATES}, got {sample_rate!r}.")


def _is_fatal(exc: BaseException) -> bool:
    # Rust panics surface as pyo3's PanicException, a BaseException: those are data errors, Ctrl-C is not.
    return isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit))


def _as_mono_pcm(pcm: np.ndarray | torch.Tensor) -> np.ndarray:
    """Float32 contiguous [T] from [T] or [1, T] input; non-finite values become 0."""
    if isinstance(pcm, torch.Tensor):
        pcm = pcm.detach().to("cpu", torch.float32).numpy()
    arr = np.asarray(pcm, dtype=np.float32)
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 1:
        raise AudioError(f"Opus streams are mono: expected pcm of shape [T] or [1, T], got {arr.shape}.")
    if not np.isfinite(arr).all():
        arr = np.nan_to_num(arr, nan=0.0, posinf=1.0, neginf=-1.0)
    return np.ascontiguousarray(arr)


class OpusEncoderStream:
    """Float32 pcm in, Ogg-Opus pages out. The first non-empty output starts with the stream headers."""

    def __init__(self, sample_rate: int = 24000) -> None:
        _check_rate(sample_rate)
        self.sample_rate = sample_rate
        self._writer = sphn.OpusStreamWriter(sample_rate)
        self._samples_in = 0

    def push(self, pcm: np.ndarray | torch.Tensor) -> bytes:
        """Encodes `pcm` ([T] or [1, T], any length) and returns the pages completed so far (maybe b"").

        Samples past the last whole 960-sample packet wait inside the encoder for the next call.
        """
        arr = _as_mono_pcm(pcm)
        if arr.size == 0:
            return b""
        self._samples_in += arr.size
        return self._writer.append_pcm(arr)

    encode = push  # the name the server and client use

    def headers(self) -> bytes:
        """Returns the OpusHead and OpusTags pages if nothing was sent yet (b"" otherwise).

        Lets a sender open the stream before any audio exists; the one primer sample fed to sphn to get them
        is silence and is only sent if more audio follows.
        """
        if self._samples_in:
            return b""
        return self.push(np.zeros(1, dtype=np.float32))

    def flush(self) -> bytes:
        """Pads the waiting samples with silence to a whole packet and returns its page (b"" if none wait)."""
        missing = -self._samples_in % PACKET_SAMPLES
        if missing == 0:
            return b""
        return self.push(np.zeros(missing, dtype=np.float32))


class DecodeLimitReached(ProtocolError):
    """A push held more audio than the caller allowed (`sample_limit`); the rest of it was dropped."""


class OpusDecoderStream:
    """Ogg-Opus bytes in (split anywhere), float32 pcm out.

    `push` raises `ProtocolError` for bytes that are not a valid Ogg-Opus stream; the bad bytes are dropped,
    pages decoded before them stay readable, and later pushes continue at the next valid page.

    The work per pushed byte is bounded: a valid stream has each byte checksummed once, so checksum work is
    paid from an allowance of two bytes per byte pushed (capped). Bytes crafted so that a candidate page
    starts every few bytes (each claiming a 64 KiB page) exhaust it, and the rest of the buffer is dropped
    instead of being checksummed again at every offset.
    """

    MAX_PAGE_BYTES = _HEADER_SIZE + 255 + 255 * 255  # the largest page Ogg can describe
    _CRC_ALLOWANCE_CAP = 4 * MAX_PAGE_BYTES

    def __init__(self, sample_rate: int = 24000, verify_crc: bool = True) -> None:
        _check_rate(sample_rate)
        self.sample_rate = sample_rate
        self.verify_crc = verify_crc  # off only for clients known to write wrong checksums
        self._reader = sphn.OpusStreamReader(sample_rate)
        self._buffer = bytearray()
        self._pos = 0  # start of the unparsed bytes in _buffer; compacted once per push
        self._pcm: list[np.ndarray] = []
        self._crc_allowance = 0  # bytes that may still be checksummed (see the class docstring)
        self.checksummed_bytes = 0
        self.pages_decoded = 0
        self.errors = 0

    @property
    def pending_bytes(self) -> int:
        """Bytes of an incomplete page waiting for the rest of it."""
        return len(self._buffer) - self._pos

    def push(self, data: bytes | bytearray | memoryview, sample_limit: int | None = None) -> None:
        """Feeds a chunk of the stream. Raises `ProtocolError` if it holds bytes that are not Ogg-Opus.

        With `sample_limit`, decoding stops once this push produced that many samples (a page may overshoot
        it): the undecoded rest is dropped and `DecodeLimitReached` raised (the pcm decoded so far stays
        readable).
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ProtocolError(f"Opus stream data must be bytes, got {type(data).__name__}.")
        self._buffer += data
        self._crc_allowance = min(self._crc_allowance + 2 * len(data), self._CRC_ALLOWANCE_CAP)
        problems: list[str] = []
        decoded = 0
        while True:
            if sample_limit is not None and decoded >= sample_limit and self.pending_bytes:
                dropped = self.pending_bytes
                self._buffer.clear()
                self._pos = 0
                self.errors += 1
                raise DecodeLimitReached(f"more audio than allowed ({sample_limit} samples) in one push; "
                                         f"dropped the remaining {dropped} bytes")
            page, problem = self._next_page()
            if problem:
                problems.append(problem)
                continue
            if page is None:
                break
            decoded += self._decode_page(page, problems)
        del self._buffer[: self._pos]
        self._pos = 0
        if problems:
            self.errors += len(problems)
            shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
            raise ProtocolError(f"invalid Ogg-Opus data, dropped: {shown}")

    def read(self) -> np.ndarray:
        """Returns all pcm decoded since the last read as float32 [T] (possibly empty)."""
        if not self._pcm:
            return np.zeros(0, dtype=np.float32)
        out = np.concatenate(self._pcm) if len(self._pcm) > 1 else self._pcm[0]
        self._pcm = []
        return out

    def feed(self, data: bytes, sample_limit: int | None = None) -> np.ndarray:
        """`push(data)` then `read()`: the pcm (float32 [T]) completed by this chunk."""
        self.push(data, sample_limit)
        return self.read()

    def finish(self) -> None:
        """Declares the end of the stream; raises `ProtocolError` if it stopped in the middle of a page."""
        if self._buffer:
            n = len(self._buffer)
            self._buffer.clear()
            self.errors += 1
            raise ProtocolError(f"Ogg-Opus stream ended inside a page ({n} bytes of a truncated page).")

    def _resync(self, problem: str) -> tuple[None, str]:
        """Skips bytes up to the next capture pattern after the current position."""
        nxt = self._buffer.find(_CAPTURE, self._pos + 1)
        end = len(self._buffer) if nxt < 0 else nxt
        dropped, self._pos = end - self._pos, end
        return None, f"{problem} ({dropped} bytes)"

    def _next_page(self) -> tuple[bytes | None, str | None]:
        """Cuts one complete, verified page off the buffer: (page, None), (None, problem) or (None, None)."""
        buf, pos = self._buffer, self._pos
        available = len(buf) - pos
        if available == 0:
            return None, None
        head = bytes(buf[pos : pos + 4])
        if head != _CAPTURE[: len(head)]:
            return self._resync(f"not an Ogg page: starts with {head.hex()}")
        if available < _HEADER_SIZE:
            return None, None
        if buf[pos + 4] != 0:
            return self._resync(f"unsupported Ogg version {buf[pos + 4]}")
        if buf[pos + 5] & ~0x07:
            return self._resync(f"bad Ogg header flags 0x{buf[pos + 5]:02x}")
        n_segments = buf[pos + 26]
        table = pos + _HEADER_SIZE
        if available < _HEADER_SIZE + n_segments:
            return None, None
        size = _HEADER_SIZE + n_segments + sum(buf[table : table + n_segments])
        if available < size:
            return None, None
        if self.verify_crc and size > self._crc_allowance:
            dropped = available
            self._pos = len(buf)
            return None, f"too many invalid Ogg pages, dropped the rest ({dropped} bytes)"
        page = bytes(buf[pos : pos + size])
        stored = int.from_bytes(page[22:26], "little")
        if self.verify_crc:
            self._crc_allowance -= size
            self.checksummed_bytes += size
            if ogg_crc(page[:22] + b"\0\0\0\0" + page[26:]) != stored:
                return self._resync("Ogg page checksum mismatch")
        self._pos += size
        return page, None

    def _decode_page(self, page: bytes, problems: list[str]) -> int:
        """Decodes one page; returns the number of samples it gave."""
        try:
            pcm = self._reader.append_bytes(page)
        except BaseException as exc:  # any codec failure means a bad page from the client
            if _is_fatal(exc):
                raise
            # The reader may keep half-parsed state after a failure; a fresh one resumes at the next page.
            self._reader = sphn.OpusStreamReader(self.sample_rate)
            problems.append(f"Opus packet rejected by the decoder: {exc}")
            return 0
        self.pages_decoded += 1
        if pcm is not None and pcm.size:
            self._pcm.append(np.asarray(pcm, dtype=np.float32).reshape(-1))
            return int(pcm.size)
        return 0


def encode_ogg_opus(pcm: np.ndarray | torch.Tensor, sample_rate: int = 24000) -> bytes:
    """Encodes mono pcm ([T] or [1, T]) into a complete Ogg-Opus stream, padded to whole 960-sample packets."""
    encoder = OpusEncoderStream(sample_rate)
    arr = _as_mono_pcm(pcm)
    step = 50 * PACKET_SAMPLES
    parts = [encoder.push(arr[i : i + step]) for i in range(0, arr.size, step)]
    parts.append(encoder.flush())
    return b"".join(parts) if arr.size else encoder.headers()


def decode_ogg_opus(data: bytes, sample_rate: int = 24000) -> np.ndarray:
    """Decodes a complete Ogg-Opus stream to float32 [T]; raises `ProtocolError` if any of it is invalid.

    The output keeps the codec's look-ahead delay (about 156 samples at 24 kHz) at its start.
    """
    decoder = OpusDecoderStream(sample_rate)
    decoder.push(data)
    decoder.finish()
    return decoder.read()
