"""/api/tts_streaming's output formats (`?format=`, those of Kyutai's moshi-server): the same speech as
PcmMessagePack, as Ogg-Opus pages in msgpack maps, as raw Ogg-Opus, as raw float32 frames."""

from __future__ import annotations

import asyncio

import aiohttp
import msgpack
import numpy as np
import pytest
import torch
from conftest import init_preset

from openmoshi.audio.opus import OpusEncoderStream, decode_ogg_opus
from openmoshi.checkpoint import save_safetensors
from openmoshi.errors import ProtocolError
from openmoshi.server.background import RunningServer
from openmoshi.server.limits import SessionLimits
from openmoshi.server.tts import TtsOptions

pytestmark = pytest.mark.usefixtures("one_torch_thread")
KEY = {"kyutai-api-key": "secret"}
TEXT = "Hello there, how are you?"


@pytest.fixture(scope="module")
def tts_server(tmp_path_factory):
    model = init_preset(tmp_path_factory.mktemp("tts") / "tiny-tts", "tiny-tts", 5)
    voices = tmp_path_factory.mktemp("voices")
    save_safetensors({"speaker_wavs": torch.randn(1, 32, 5, generator=torch.Generator().manual_seed(0))},
                     voices / "happy.safetensors")
    options = TtsOptions(voice_dir=voices, default_voice="happy", temperature=0.0)
    limits = SessionLimits(max_message_bytes=1 << 20, idle_timeout_s=5.0)
    with RunningServer(model, max_sessions=2, token="secret", limits=limits, tts_options=options) as running:
        yield running


async def speak(url: str, text: str = TEXT) -> tuple[list, aiohttp.WSMessage]:
    """Words in, then every frame the server sends (bytes) and its close message."""
    frames = []
    async with aiohttp.ClientSession() as http, http.ws_connect(url, headers=KEY) as ws:
        for word in text.split():
            await ws.send_bytes(msgpack.packb({"type": "Text", "text": word}))
        await ws.send_bytes(msgpack.packb({"type": "Eos"}))
        while True:
            message = await ws.receive()
            if message.type != aiohttp.WSMsgType.BINARY:
                return frames, message
            frames.append(message.data)


def _maps(frames: list) -> list[dict]:
    return [msgpack.unpackb(f, raw=False) for f in frames]


def test_every_format_carries_the_same_speech(tts_server):
    base = tts_server.ws_base + "/api/tts_streaming?format="
    maps = _maps(asyncio.run(speak(base + "PcmMessagePack"))[0])
    pcm = np.concatenate([np.asarray(m["pcm"], np.float32) for m in maps if m["type"] == "Audio"])
    words = [m for m in maps if m["type"] == "Text"]
    assert [w["text"] for w in words] == TEXT.split() and len(pcm) % 1920 == 0

    raw, closed = asyncio.run(speak(base + "Pcm"))  # nothing but little-endian float32 frames
    assert closed.type == aiohttp.WSMsgType.CLOSE and closed.data == aiohttp.WSCloseCode.OK
    assert all(len(f) == 1920 * 4 for f in raw)
    np.testing.assert_allclose(np.frombuffer(b"".join(raw), "<f4"), pcm, rtol=0, atol=1e-5)

    ogg, closed = asyncio.run(speak(base + "OggOpus"))  # raw Ogg pages: headers first
    assert closed.data == aiohttp.WSCloseCode.OK and ogg[0].startswith(b"OggS") and b"OpusHead" in ogg[0]
    stream = b"".join(ogg)
    encoder = OpusEncoderStream()  # the pcm above, encoded here frame by frame as a session does
    expected = encoder.headers() + b"".join(encoder.push(pcm[i:i + 1920]) for i in range(0, len(pcm), 1920))
    decoded = decode_ogg_opus(stream)
    assert abs(len(decoded) - len(pcm)) < 1920  # the encoder holds back less than one packet
    assert stream == expected  # one session at a time: the same decoded samples, hence the same pages

    maps = _maps(asyncio.run(speak(base + "OggOpusMessagePack"))[0])
    kinds = [m["type"] for m in maps]
    assert kinds[0] == "Ready" and kinds[1] == "OggOpus" and "Audio" not in kinds
    assert b"OpusHead" in maps[1]["data"]
    assert b"".join(m["data"] for m in maps if m["type"] == "OggOpus") == stream
    assert [(m["text"], m["start_s"], m["stop_s"]) for m in maps if m["type"] == "Text"] == \
        [(w["text"], w["start_s"], w["stop_s"]) for w in words]


def test_raw_formats_say_why_in_the_close_frame(tts_server):
    url = tts_server.ws_base + "/api/tts_streaming?format="
    frames, closed = asyncio.run(speak(url + "Pcm&voice=nobody"))
    assert frames == [] and closed.data == aiohttp.WSCloseCode.POLICY_VIOLATION and "no voice" in closed.extra
    frames, closed = asyncio.run(speak(url + "Wav"))
    message = _maps(frames)[0]
    assert message["type"] == "Error" and "OggOpusMessagePack" in message["message"]


def test_ogg_data_as_bin_or_as_a_list_of_byte_values(tts_server):
    """A client reads OggOpusMessagePack audio from openmoshi (msgpack bin) and from Kyutai's rust server (its
    `Vec<u8>` written by rmp_serde as an array of integers) alike with `ogg_bytes`."""
    from openmoshi.server.dsm_protocol import ogg_bytes
    maps = _maps(asyncio.run(speak(tts_server.ws_base + "/api/tts_streaming?format=OggOpusMessagePack"))[0])
    ours = [m["data"] for m in maps if m["type"] == "OggOpus"]
    assert all(isinstance(d, bytes) for d in ours)
    kyutai = [msgpack.unpackb(msgpack.packb({"type": "OggOpus", "data": list(d)}))["data"] for d in ours]
    assert all(isinstance(d, list) for d in kyutai)
    assert [ogg_bytes(d) for d in kyutai] == [ogg_bytes(d) for d in ours] == ours
    with pytest.raises(ProtocolError, match="list of 0..255"):
        ogg_bytes([1, 256])
