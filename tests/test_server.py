"""The real-time server on loopback with a tiny model: protocol, concurrency, bad input, capacity."""

from __future__ import annotations

import asyncio
import json
import os
import random
import urllib.request

import aiohttp
import numpy as np
import pytest

from conftest import read_speech
from ogg_pages import repage
from openmoshi.audio.opus import OpusEncoderStream, decode_ogg_opus
from openmoshi.bundle import init_model
from openmoshi.client import ServerBusy, converse
from openmoshi.server.background import RunningServer
from openmoshi.server.limits import SessionLimits

GREEDY = {"text_temperature": 0, "audio_temperature": 0}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return init_model("tiny", tmp_path_factory.mktemp("model") / "tiny", seed=3)


@pytest.fixture(scope="module")
def server(tiny_model):
    # Late input waits instead of being dropped: on a loaded CI machine a dropped frame would change a
    # conversation, and these tests compare conversations exactly (dropping is tested in test_server_realtime).
    with RunningServer(tiny_model, max_sessions=4, max_backlog_frames=None, standing_queue_s=None) as running:
        yield running


@pytest.fixture(scope="module")
def user_audio(speech_files) -> list[np.ndarray]:
    return [read_speech(path, 2.0)[0].numpy() for path in speech_files]


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read().decode()


def test_python_client_gets_audio_and_text(server, user_audio):
    conv = asyncio.run(converse(server.url, user_audio[0], params=GREEDY))
    assert conv.errors == []
    assert conv.handshake is not None and conv.metadata["max_sessions"] == 4
    assert conv.metadata["text_temperature"] == 0
    # The server-info fields Kyutai's web client validates (numbers, strings, a build_info of strings).
    for key in ("text_temperature", "text_topk", "audio_temperature", "audio_topk", "pad_mult",
                "repetition_penalty_context", "repetition_penalty"):
        assert isinstance(conv.metadata[key], (int, float))
    assert isinstance(conv.metadata["lm_model_file"], str) and isinstance(conv.metadata["instance_name"], str)
    assert all(isinstance(v, str) for v in conv.metadata["build_info"].values())
    # Moshi answers every user frame after the model's one-frame delay: the durations match.
    sent = len(user_audio[0]) + int(0.5 * 24_000)
    assert abs(len(conv.pcm) - sent) <= 3 * 1920
    assert np.abs(conv.pcm).max() > 0
    assert conv.audio_messages > 10
    assert len(conv.pieces) > 0 and all(isinstance(p, str) and p for _, p in conv.pieces)


async def _web_client_like(url: str, pcm: np.ndarray) -> tuple[bytes, list[str], list[int]]:
    """Kyutai's web client: waits for the handshake, then one Ogg page (2 x 20 ms Opus) per message."""
    stream = OpusEncoderStream().push(np.concatenate([pcm, np.zeros(4800, np.float32)]))
    pages = repage(stream, packets_per_page=2)
    received, texts, kinds = b"", [], []
    async with aiohttp.ClientSession() as session, session.ws_connect(url + "?text_temperature=0&audio_temperature=0") as ws:
        first = await ws.receive(timeout=30)
        kinds.append(first.data[0])
        assert first.data[0] == 0, "the handshake comes first"

        async def reader():
            nonlocal received
            async for message in ws:
                kinds.append(message.data[0])
                if message.data[0] == 1:
                    received += message.data[1:]
                elif message.data[0] == 2:
                    texts.append(message.data[1:].decode())

        task = asyncio.create_task(reader())
        for page in pages:
            await ws.send_bytes(b"\x01" + page)
            await asyncio.sleep(0.04)  # two 20 ms frames per page: real time
        await asyncio.sleep(1.0)
        await ws.close()
        await asyncio.gather(task, return_exceptions=True)
    return received, texts, kinds


def test_web_client_like_conversation(server, user_audio):
    received, texts, kinds = asyncio.run(_web_client_like(server.url, user_audio[1]))
    assert set(kinds) <= {0, 1, 2, 4}
    pcm = decode_ogg_opus(received)  # the stream Moshi sent is one valid Ogg-Opus stream
    assert len(pcm) >= len(user_audio[1]) - 4 * 1920
    assert texts


async def _together(url: str, clips: list[np.ndarray]):
    return await asyncio.gather(*(converse(url, clip, params=GREEDY) for clip in clips))


def test_concurrent_sessions_match_solo_runs(server, user_audio):
    solo = [asyncio.run(converse(server.url, clip, params=GREEDY)) for clip in user_audio]
    together = asyncio.run(_together(server.url, user_audio))
    for alone, shared in zip(solo, together):
        assert shared.errors == []
        mine, theirs = [p for _, p in shared.pieces], [p for _, p in alone.pieces]
        # the same words; on a starved machine the session's last step may land on either side of the close
        k = min(len(mine), len(theirs))
        assert mine[:k] == theirs[:k] and max(len(mine), len(theirs)) - k <= 1, (mine, theirs)
        n = min(len(alone.pcm), len(shared.pcm))
        assert n > len(user_audio[0]) - 4 * 1920
        assert np.array_equal(alone.pcm[:n], shared.pcm[:n])
    # Real-time pace: four sessions of 2.5 s each were served in about 2.5 s, not 10 s.
    late = server.engine.metrics.steps_late / max(1, server.engine.metrics.steps)
    assert late < 0.2


def _garbage_messages(rng: random.Random, ogg: bytes) -> list:
    messages: list = []
    for i in range(1200):
        choice = i % 8
        if choice == 0:
            messages.append(bytes([rng.randrange(8, 256)]) + rng.randbytes(rng.randrange(0, 40)))
        elif choice == 1:
            messages.append(b"\x01" + rng.randbytes(rng.randrange(1, 300)))
        elif choice == 2:
            cut = rng.randrange(1, len(ogg))
            messages.append(b"\x01" + ogg[:cut])
        elif choice == 3:
            messages.append(b"")
        elif choice == 4:
            messages.append("a text frame")
        elif choice == 5:
            messages.append(bytes([rng.choice([0, 2, 4, 5, 7])]) + b"server-only kind")
        elif choice == 6:
            messages.append(b"\x01OggS" + rng.randbytes(60))
        else:
            messages.append(b"\x01" + ogg[rng.randrange(0, len(ogg) // 2):])
    messages.append(b"\x01" + os.urandom(2 << 20))  # a huge frame
    return messages


async def _fuzz(url: str, messages: list) -> tuple[int, bool]:
    errors = 0
    async with aiohttp.ClientSession() as session, session.ws_connect(url, max_msg_size=0) as ws:
        assert (await ws.receive(timeout=30)).data[0] == 0
        for message in messages[:-1]:
            if isinstance(message, str):
                await ws.send_str(message)
            else:
                await ws.send_bytes(message)
        # The huge last message closes the session (1009), and aiohttp drops the messages it had not yet
        # handed over: it goes out once the replies to the others stopped coming.
        sent_huge = False
        while True:
            try:
                message = await ws.receive(timeout=5.0)
            except asyncio.TimeoutError:
                if sent_huge:
                    break
                await ws.send_bytes(messages[-1])
                sent_huge = True
                continue
            if message.type != aiohttp.WSMsgType.BINARY:
                break
            errors += message.data[0] == 5
        return errors, ws.closed


def test_malformed_input_never_disturbs_other_sessions(tiny_model, user_audio):
    ogg = OpusEncoderStream().push(user_audio[2][:24_000])
    messages = _garbage_messages(random.Random(0), ogg)
    # The valid pieces of the fuzz stream are far faster than real time: a budget that lets them through,
    # so that every malformed message reaches the parser (the default budget closes such a client). The
    # flood's own backlog is capped (its oldest frames dropped); the paced session's input is never dropped.
    with RunningServer(tiny_model, max_sessions=4, limits=SessionLimits(input_rate=1e6, input_burst_s=1e6),
                       max_backlog_frames=50, standing_queue_s=None) as server:
        alone = asyncio.run(converse(server.url, user_audio[3], params=GREEDY))

        async def both():
            return await asyncio.gather(_fuzz(server.url, messages),
                                        converse(server.url, user_audio[3], params=GREEDY))

        (errors, _), during = asyncio.run(both())
        status, body = _get(server.http + "/health")
    # Unknown kinds, empty, text and server-only messages (601) always get an error reply; garbage audio
    # mostly does too (a truncated stream can still hold whole valid pages, which are simply decoded).
    assert errors >= 900
    # The same words, in the same order. While the flood lasts steps are slow (the event loop decoding it
    # holds the GIL), so the last piece or two may not have come before the client hung up.
    solo, shared = [p for _, p in alone.pieces], [p for _, p in during.pieces]
    assert len(shared) >= len(solo) - 3 and shared == solo[:len(shared)]
    n = min(len(alone.pcm), len(during.pcm))
    assert np.array_equal(alone.pcm[:n], during.pcm[:n])
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_defaults_are_the_served_models(server):
    status, body = _get(server.http + "/api/defaults")
    gen = server.engine.bundle.generation
    assert status == 200 and json.loads(body) == {
        "text_temperature": gen["temp_text"], "text_topk": gen["top_k_text"], "audio_temperature": gen["temp"],
        "audio_topk": gen["top_k"], "pad_mult": 0.0, "repetition_penalty": 1.0, "repetition_penalty_context": 64}


def test_health_and_metrics(server):
    status, body = _get(server.http + "/health")
    health = json.loads(body)
    assert health["max_sessions"] == 4 and health["sessions"] == 0
    assert set(health) == {"status", "sessions", "max_sessions"}  # no paths for anyone who asks
    status, text = _get(server.http + "/metrics")
    assert status == 200
    assert "openmoshi_sessions_active 0" in text
    assert 'openmoshi_step_seconds{quantile="0.5"}' in text
    assert "openmoshi_protocol_errors_total" in text


def test_web_page_is_served(server):
    status, html = _get(server.http + "/")
    assert status == 200 and "<html" in html.lower()
    status, js = _get(server.http + "/js/protocol.js")
    assert status == 200 and "api/chat" in js


def test_over_capacity_and_slot_reuse(tiny_model, user_audio):
    with RunningServer(tiny_model, max_sessions=1) as small:
        async def scenario():
            first = asyncio.create_task(converse(small.url, user_audio[0][:24_000], params=GREEDY))
            await asyncio.sleep(0.5)
            with pytest.raises(ServerBusy):
                await converse(small.url, user_audio[1][:24_000])
            await first
            # The slot is free again once the first client left.
            return await converse(small.url, user_audio[1][:12_000], params=GREEDY)

        again = asyncio.run(scenario())
        assert again.errors == [] and len(again.pcm) > 0
        assert small.engine.metrics.sessions_rejected == 1


def test_connect_disconnect_cycles_leave_nothing_behind(tiny_model):
    import resource

    with RunningServer(tiny_model, max_sessions=2) as small:
        async def cycles():
            async with aiohttp.ClientSession() as session:
                for i in range(100):
                    async with session.ws_connect(small.url) as ws:
                        assert (await ws.receive(timeout=10)).data[0] == 0
                        if i % 2:
                            await ws.send_bytes(b"\x01" + OpusEncoderStream().push(np.zeros(1920, np.float32)))

        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        asyncio.run(cycles())
        asyncio.run(asyncio.sleep(0.3))
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert small.engine.active_sessions == 0
        assert all(slot is None for slot in small.engine.slots)
        assert after - before < 100_000  # kB: no per-session leak


def test_token_protects_everything_but_health(tiny_model):
    with RunningServer(tiny_model, max_sessions=1, token="s3cret") as guarded:
        assert _get(guarded.http + "/health")[0] == 200
        with pytest.raises(urllib.error.HTTPError) as denied:
            _get(guarded.http + "/metrics")
        assert denied.value.code == 401
        assert _get(guarded.http + "/metrics?token=s3cret")[0] == 200
        conv = asyncio.run(converse(guarded.url + "?token=s3cret", np.zeros(12_000, np.float32)))
        assert conv.errors == [] and len(conv.pcm) > 0
