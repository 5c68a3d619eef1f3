"""Hostile and careless clients: one session's abuse costs only that session; memory, idle slots, tokens,
shutdown. The attacks of issue #18 are regression tests here."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import numpy as np
import pytest
from conftest import eventually, read_speech

from openmoshi.audio.opus import OpusDecoderStream, OpusEncoderStream
from openmoshi.bundle import init_model
from openmoshi.client import converse
from openmoshi.server.background import RunningServer
from openmoshi.server.limits import InputBudget, SessionLimits

GREEDY = {"text_temperature": 0, "audio_temperature": 0}
CRAFTED = b"OggS\x00\x00" + b"\xff" * 22  # a page header claiming a 64 KiB page, every 28 bytes


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return init_model("tiny", tmp_path_factory.mktemp("model") / "tiny", seed=3)


@pytest.fixture(scope="module")
def speech(speech_files) -> np.ndarray:
    return read_speech(speech_files[0], 3.0)[0].numpy()


# ---- 1. bounded work per byte


def test_crafted_ogg_costs_bounded_checksum_work():
    decoder = OpusDecoderStream()
    crafted = CRAFTED * ((1 << 20) // len(CRAFTED))
    for _ in range(3):
        with pytest.raises(Exception, match="invalid Ogg-Opus"):
            decoder.push(crafted)
    # Unbounded, every 28-byte step checksummed a ~65 KB candidate: 37k * 65 KB = 2.4 GB per message.
    assert decoder.checksummed_bytes <= 4 * OpusDecoderStream.MAX_PAGE_BYTES * 3
    # The decoder still reads a valid stream afterwards, split anywhere.
    pcm = (np.sin(np.arange(24_000) / 10) * 0.3).astype(np.float32)
    ogg = OpusEncoderStream().push(pcm)
    fresh = OpusDecoderStream()
    out = np.concatenate([fresh.feed(ogg[i:i + 37]) for i in range(0, len(ogg), 37)])
    assert len(out) == 24_000 // 960 * 960 and fresh.errors == 0
    assert fresh.checksummed_bytes == len(ogg)  # each byte of a valid stream is checksummed once


def test_decode_sample_limit_drops_the_rest():
    ogg = OpusEncoderStream().push(np.zeros(24_000 * 5, np.float32))
    decoder = OpusDecoderStream()
    with pytest.raises(Exception, match="more audio than allowed"):
        decoder.push(ogg, sample_limit=24_000)
    got = len(decoder.read())
    assert 24_000 <= got < 24_000 + 2 * 960 and decoder.pending_bytes == 0


def test_input_budget_refills_at_its_rate():
    now = [0.0]
    budget = InputBudget(rate=2.0, burst=10.0, clock=lambda: now[0])
    budget.spend(10.0)
    assert budget.available() == 0.0
    now[0] = 1.5
    assert budget.available() == pytest.approx(3.0)
    now[0] = 100.0
    assert budget.available() == 10.0  # never more than the burst


async def _victim(url: str, pcm: np.ndarray) -> tuple[list[float], object]:
    arrivals: list[float] = []
    conv = await converse(url, pcm, params=GREEDY, on_audio=lambda _: arrivals.append(time.monotonic()))
    return arrivals, conv


async def _crafted_attack(url: str) -> tuple[list[str], int | None]:
    """Crafted-Ogg messages just under the size limit, then 1 MB ones (over it)."""
    errors = []
    async with aiohttp.ClientSession() as session, session.ws_connect(url, max_msg_size=0) as ws:
        assert (await ws.receive(timeout=30)).data[0] == 0
        small = b"\x01" + CRAFTED * (60_000 // len(CRAFTED))
        for _ in range(40):
            await ws.send_bytes(small)
        for _ in range(8):
            try:
                await ws.send_bytes(b"\x01" + CRAFTED * ((1 << 20) // len(CRAFTED)))
            except ConnectionError:
                break
        async for message in ws:
            if message.type == aiohttp.WSMsgType.BINARY and message.data[0] == 5:
                errors.append(message.data[1:].decode())
        return errors, ws.close_code


@pytest.fixture(scope="module")
def opus_flood() -> bytes:
    """Ten ~60 KB messages of valid Opus (tens of seconds of audio each), encoded before the clock runs."""
    noise = np.random.default_rng(0).standard_normal(24_000 * 200).astype(np.float32) * 0.1
    return OpusEncoderStream().push(noise)[:10 * 60_000]


async def _opus_flood(url: str, stream: bytes) -> tuple[list[str], int | None]:
    """Valid Opus as fast as the socket takes it."""
    errors = []
    async with aiohttp.ClientSession() as session, session.ws_connect(url, max_msg_size=0) as ws:
        assert (await ws.receive(timeout=30)).data[0] == 0
        for i in range(0, len(stream), 60_000):
            try:
                await ws.send_bytes(b"\x01" + stream[i:i + 60_000])
            except ConnectionError:
                break
        async for message in ws:
            if message.type == aiohttp.WSMsgType.BINARY and message.data[0] == 5:
                errors.append(message.data[1:].decode())
        return errors, ws.close_code


@pytest.mark.slow
def test_abusive_clients_do_not_stall_another_session(tiny_model, speech, opus_flood):
    with RunningServer(tiny_model, max_sessions=3) as srv:
        alone, alone_conv = asyncio.run(_victim(srv.url, speech))
        alone_gap = float(np.diff(alone[3:]).max())

        async def scenario():
            victim = asyncio.create_task(_victim(srv.url, speech))
            await asyncio.sleep(0.8)
            crafted, flood = await asyncio.gather(_crafted_attack(srv.url), _opus_flood(srv.url, opus_flood))
            return await victim, crafted, flood

        (arrivals, conv), (crafted_errors, crafted_code), (flood_errors, _) = asyncio.run(scenario())
        # (An idle close may end the victim once its audio ended, if its answer was cut short waiting.)
        assert all("idle" in e for e in conv.errors), conv.errors
        # Its whole answer came (or, on a machine too slow for real time, as much as it got alone).
        assert len(conv.pcm) >= min(len(speech), len(alone_conv.pcm)) - 4 * 1920
        gaps = np.diff(arrivals[3:])  # from a few frames in: the model's startup delay is not a stall
        # Under 0.3 s (one step is 80 ms); on a machine too loaded to keep that pace even without an attack,
        # no worse than 1.5 times the longest gap of the same conversation alone.
        bound = max(0.3, 1.5 * alone_gap)
        assert gaps.max() < bound, f"longest gap {gaps.max():.3f} s (alone {alone_gap:.3f} s)"
        # The crafted messages got errors, and the 1 MB one closed its session (1009: message too big).
        assert any("invalid Ogg-Opus" in e for e in crafted_errors) and crafted_code == 1009
        # The flood was cut at the input budget: a message saying so, then the close.
        assert any("faster than real time" in e for e in flood_errors)
        assert eventually(lambda: srv.engine.active_sessions == 0, 5)  # the server frees the slots on its loop


# ---- 2. bounded memory per session


def test_outbox_keeps_the_newest_frames_and_their_text():
    from openmoshi.server.session import Outbox

    async def scenario():
        outbox = Outbox(limit=3)
        batch = np.zeros((4, 1, 1920), np.float32)
        for i in range(6):
            batch[:] = i
            outbox.put(batch[1, 0], f"w{i} ")
        items = [await outbox.get() for _ in range(len(outbox))]
        return outbox, batch, items

    outbox, batch, items = asyncio.run(scenario())
    assert outbox.dropped == 3 and len(items) == 3
    assert [float(pcm[0]) for pcm, _ in items] == [3.0, 4.0, 5.0]  # the newest audio, each its own copy
    assert not any(np.shares_memory(pcm, batch) for pcm, _ in items)  # nothing pins the batch array
    assert items[0][1] == "w0 w1 w2 w3 "  # the dropped frames' words still reach the client
    assert [text for _, text in items[1:]] == ["w4 ", "w5 "]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


class RawWebSocket:
    """A websocket client on a plain socket with a tiny receive buffer that never reads: a stuck reader."""

    def __init__(self, host: str, port: int, path: str) -> None:
        import base64
        import os
        import socket

        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        self.sock.connect((host, port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                          f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                          .encode())
        reply = b""
        while b"\r\n\r\n" not in reply:
            reply += self.sock.recv(1)  # the upgrade reply only; the rest is left unread
        assert reply.startswith(b"HTTP/1.1 101"), reply

    def send_binary(self, payload: bytes) -> None:
        import os
        import struct

        mask = os.urandom(4)
        n = len(payload)
        header = bytes([0x82]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n))
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def close(self) -> None:
        self.sock.close()


@pytest.mark.slow
def test_client_that_never_reads_keeps_memory_flat_then_is_dropped(tiny_model):
    """A client streams audio and reads nothing. The server's send socket buffers are shrunk so that the
    backlog of a minutes-long run (Moshi's ~3.5 KB/s of Opus filling the kernel's buffers) builds in seconds."""
    import socket

    from openmoshi.server.app import SESSIONS_KEY

    limits = SessionLimits(send_stall_s=8.0, outbox_frames=25, send_buffer_bytes=4096)
    with RunningServer(tiny_model, max_sessions=2, limits=limits) as srv:
        client = RawWebSocket(srv.host, srv.port, "/api/chat")
        deadline = time.monotonic() + 10
        while not srv.app[SESSIONS_KEY] and time.monotonic() < deadline:
            time.sleep(0.01)
        (session,) = srv.app[SESSIONS_KEY]
        transport = session.request.transport
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        srv.loop.call_soon_threadsafe(transport.set_write_buffer_limits, 4096)
        encoder = OpusEncoderStream()
        rng = np.random.default_rng(0)
        samples: list[tuple[float, float, int]] = []  # (time, rss, outbox length)
        start, i = time.monotonic(), 0
        try:
            while time.monotonic() - start < 30 and srv.engine.active_sessions:
                data = encoder.push((rng.standard_normal(1920) * 0.1).astype(np.float32))
                if data:
                    client.send_binary(b"\x01" + data)
                i += 1
                time.sleep(max(0.0, start + i * 0.08 / 1.5 - time.monotonic()))  # 1.5x real time
                samples.append((time.monotonic() - start, _rss_mb(), len(session.outbox)))
        except OSError:
            pass  # the server disconnected us
        ended = time.monotonic() - start
        client.close()
        assert max(n for _, _, n in samples) <= limits.outbox_frames
        assert session.outbox.dropped > 0  # the reader was stuck long enough to drop the oldest audio
        assert session.closed_because and "read nothing" in session.closed_because
        assert ended < 28 and srv.engine.active_sessions == 0  # disconnected, slot freed
        stuck = [rss for t, rss, n in samples if n == limits.outbox_frames]
        assert len(stuck) > 30
        assert max(stuck) - min(stuck) < 8.0, f"RSS moved {max(stuck) - min(stuck):.1f} MB while stuck"


# ---- 3. idle timeout


async def _idle_client(url: str, send_pings: bool) -> tuple[list[str], float, int | None]:
    errors = []
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        assert (await ws.receive(timeout=30)).data[0] == 0
        await ws.send_bytes(b"\x01" + OpusEncoderStream().push(np.zeros(3840, np.float32)))
        start = time.monotonic()
        while True:
            if send_pings:
                await ws.send_bytes(b"\x06")  # pings are not audio: they do not keep a slot
            message = await ws.receive(timeout=10)
            if message.type != aiohttp.WSMsgType.BINARY:
                break
            if message.data[0] == 5:
                errors.append(message.data[1:].decode())
            if not send_pings:
                continue
            await asyncio.sleep(0.2)
        return errors, time.monotonic() - start, ws.close_code


@pytest.mark.parametrize("send_pings", [False, True])
def test_idle_session_is_closed_and_frees_its_slot(tiny_model, send_pings):
    with RunningServer(tiny_model, max_sessions=1, limits=SessionLimits(idle_timeout_s=1.5)) as srv:
        errors, waited, code = asyncio.run(_idle_client(srv.url, send_pings))
        assert any("no audio received for 1.5 s" in e for e in errors), errors
        assert 1.0 < waited < 5.0 and code is not None
        deadline = time.monotonic() + 5
        while srv.engine.active_sessions and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.engine.active_sessions == 0
        # The freed slot takes the next conversation (which ends idle too, 1.5 s after its answer).
        conv = asyncio.run(converse(srv.url, np.zeros(9600, np.float32), params=GREEDY))
        assert conv.handshake and len(conv.pcm) > 0 and all("idle" in e for e in conv.errors)


# ---- 4. token


TOKEN = "s3cret&x=1#frag+plus é"  # characters a URL must encode


def test_token_page_assets_websocket_and_logs(tiny_model, caplog):
    import logging
    import urllib.error
    import urllib.request
    from urllib.parse import quote

    caplog.set_level(logging.INFO, logger="aiohttp.access")
    with RunningServer(tiny_model, max_sessions=1, token=TOKEN) as srv:
        def get(path: str, cookie: str | None = None) -> tuple[int, str, str]:
            request = urllib.request.Request(srv.http + path, headers={"Cookie": cookie} if cookie else {})
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return response.status, response.read().decode(), response.headers.get("Set-Cookie", "")
            except urllib.error.HTTPError as exc:
                return exc.code, "", ""

        status, html, set_cookie = get("/?token=" + quote(TOKEN, safe=""))
        assert status == 200 and "<html" in html.lower()
        assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie
        cookie = set_cookie.split(";")[0]
        # The page's style sheet, scripts and vendored decoder come with the cookie the page URL set.
        for asset in ("/style.css", "/js/app.js", "/js/protocol.js", "/vendor/opus-recorder/decoderWorker.min.js"):
            assert get(asset, cookie)[0] == 200, asset
            assert get(asset)[0] == 401, asset
        assert get("/", "openmoshi_token=wrong")[0] == 401
        # /health answers everyone, without paths.
        status, body, _ = get("/health")
        assert status == 200 and "/" not in body and "tiny" not in body
        # Our client encodes the token; a wrong one is refused.
        conv = asyncio.run(converse(srv.url, np.zeros(9600, np.float32), params={"token": TOKEN}))
        assert conv.errors == [] and len(conv.pcm) > 0
        with pytest.raises(Exception, match="401|cannot connect"):
            asyncio.run(converse(srv.url, np.zeros(9600, np.float32), params={"token": "s3cret"}))
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "GET /style.css" in logged and "/api/chat" in logged  # the access log is on ...
    assert "s3cret" not in logged and "token" not in logged  # ... and never shows a query string


# ---- 5. graceful shutdown, option checks, bind failures (the real `serve` command in a subprocess)


def _serve(model, *extra: str):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "openmoshi", "serve", "--model", str(model), "--device", "cpu",
                             "--threads", "1", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=repo)


def _wait_for_port(proc) -> int:
    import re

    line = proc.stdout.readline()
    match = re.search(r"serving .* on http://127\.0\.0\.1:(\d+)/", line)
    assert match, (line, proc.stderr.read() if proc.poll() is not None else "")
    return int(match.group(1))


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_closes_open_sessions_and_exits_fast(tiny_model, sig):
    import signal

    proc = _serve(tiny_model, "--port", "0")
    try:
        port = _wait_for_port(proc)

        async def session():
            async with aiohttp.ClientSession() as http, http.ws_connect(f"ws://127.0.0.1:{port}/api/chat") as ws:
                assert (await ws.receive(timeout=30)).data[0] == 0
                await ws.send_bytes(b"\x01" + OpusEncoderStream().push(np.zeros(3840, np.float32)))
                await asyncio.sleep(0.3)
                sent = time.monotonic()
                proc.send_signal(getattr(signal, sig))
                errors = []
                async for message in ws:
                    if message.type == aiohttp.WSMsgType.BINARY and message.data[0] == 5:
                        errors.append(message.data[1:].decode())
                return errors, ws.close_code, time.monotonic() - sent, sent

        errors, code, closed_after, sent = asyncio.run(session())
        proc.wait(timeout=10)
        exited_after = time.monotonic() - sent
    finally:
        proc.kill()
    assert errors == ["server shutting down"]
    assert code == 1001  # going away
    assert closed_after < 1.0 and exited_after < 2.0, (closed_after, exited_after)
    assert proc.returncode == 0


def test_serve_refuses_bad_options_before_loading(tmp_path, capsys):
    from openmoshi.cli.main import main

    for option, value in (("--max-backlog", "nan"), ("--max-backlog", "-5"), ("--idle-timeout", "0"),
                          ("--input-rate", "inf"), ("--max-sessions", "0"), ("--port", "70000"),
                          ("--max-message-kb", "0.5"), ("--token", " ")):
        # The model does not exist: an option error shows that options are checked before any loading.
        code = main(["serve", "--model", str(tmp_path / "no-such-model"), option, value])
        out, err = capsys.readouterr()
        assert code == 1, (option, value, err)
        assert err.startswith("error: ") and option in err and "Traceback" not in err, err
        assert "serving" not in out


@pytest.mark.slow
def test_serve_bind_failure_is_a_clear_error(tiny_model):
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        proc = _serve(tiny_model, "--port", str(taken.getsockname()[1]))
        out, err = proc.communicate(timeout=300)
    finally:
        taken.close()
    assert proc.returncode == 1
    assert "serving" not in out  # announced only once bound
    assert "cannot listen on 127.0.0.1" in err and "--port" in err and "Traceback" not in err
