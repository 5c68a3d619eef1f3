"""The streaming ASR and TTS websockets of Kyutai's DSM clients (msgpack), against in-process servers with tiny
stt / tts models: same words as `transcribe`, same audio as `speak`, concurrency, auth, bad messages."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import aiohttp
import msgpack
import numpy as np
import pytest
import torch
from conftest import init_preset, read_speech

from openmoshi.bundle import load_model
from openmoshi.checkpoint import save_safetensors
from openmoshi.generation.stt import WordStream, transcribe_recordings, words_from_tokens
from openmoshi.generation.tts import Synthesizer, voice_condition
from openmoshi.lm.families import SttSettings
from openmoshi.server.background import RunningServer
from openmoshi.server.limits import SessionLimits
from openmoshi.server.tts import TtsOptions

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FRAME = 1920
SR = 24_000


@pytest.fixture(scope="module")
def tiny_stt(tmp_path_factory):
    return init_preset(tmp_path_factory.mktemp("stt") / "tiny-stt", "tiny-stt", 3)


@pytest.fixture(scope="module")
def tiny_tts(tmp_path_factory):
    return init_preset(tmp_path_factory.mktemp("tts") / "tiny-tts", "tiny-tts", 5)


@pytest.fixture(scope="module")
def voices(tmp_path_factory):
    """Voice embeddings named as Kyutai's tts-voices names them (`<voice>.wav.<id>@240.safetensors`)."""
    folder = tmp_path_factory.mktemp("voices")
    (folder / "expresso").mkdir()
    gen = torch.Generator().manual_seed(0)
    save_safetensors({"speaker_wavs": torch.randn(1, 32, 5, generator=gen)},
                     folder / "expresso" / "happy.wav.1e68beda@240.safetensors")
    save_safetensors({"speaker_wavs": torch.randn(1, 32, 5, generator=gen)}, folder / "other.safetensors")
    return folder


@pytest.fixture(scope="module")
def stt_bundle(tiny_stt):
    """A copy of the model outside the server (whose codec is streaming): the `transcribe` / `speak` side."""
    return load_model(tiny_stt)


@pytest.fixture(scope="module")
def tts_bundle(tiny_tts):
    return load_model(tiny_tts)


LIMITS = SessionLimits(max_message_bytes=1 << 20, idle_timeout_s=5.0)


@pytest.fixture(scope="module")
def asr_server(tiny_stt):
    with RunningServer(tiny_stt, max_sessions=2, token="secret", limits=LIMITS) as running:
        yield running


@pytest.fixture(scope="module")
def tts_server(tiny_tts, voices):
    options = TtsOptions(voice_dir=voices, default_voice="expresso/happy.wav", temperature=0.0)
    with RunningServer(tiny_tts, max_sessions=2, token="secret", limits=LIMITS, tts_options=options) as running:
        yield running


KEY = {"kyutai-api-key": "secret"}


def pack(message: dict) -> bytes:
    return msgpack.packb(message, use_single_float=True)


async def transcribe_over_ws(url: str, pcm: np.ndarray, flush_s: float, chunk: int = FRAME,
                             headers: dict | None = None) -> list[dict]:
    """As Kyutai's stt_from_file client: Audio messages, a Marker, silence until the Marker comes back."""
    out = []
    async with aiohttp.ClientSession() as http, http.ws_connect(url, headers=headers or KEY) as ws:
        async def send() -> None:
            for i in range(0, len(pcm), chunk):
                await ws.send_bytes(pack({"type": "Audio", "pcm": pcm[i:i + chunk].tolist()}))
            await ws.send_bytes(pack({"type": "Audio", "pcm": [0.0] * int(flush_s * SR)}))
            await ws.send_bytes(pack({"type": "Marker", "id": 7}))
            for _ in range(10):  # as the client: silence after the marker, so that the model steps on
                await ws.send_bytes(pack({"type": "Audio", "pcm": [0.0] * SR}))

        sender = asyncio.create_task(send())
        async for message in ws:
            data = msgpack.unpackb(message.data, raw=False)
            out.append(data)
            if data["type"] in ("Marker", "Error"):
                break
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
    return out


def test_word_stream_equals_words_from_tokens(tiny_stt):
    tokenizer = load_model(tiny_stt).tokenizer
    rng = np.random.default_rng(0)
    for _ in range(50):
        # pads and end-pads often, pieces sometimes, runs long enough to cross the 1 s cap
        tokens = rng.choice([0, 3, 3, 3, 3, 5, 17, 40, 77, 120, 2], size=int(rng.integers(1, 80))).tolist()
        expected = words_from_tokens(tokens, tokenizer, 12.5, 0.0, 1e9)
        stream = WordStream(tokenizer, 12.5)
        got = [w for t in tokens for w in stream.push(t)] + stream.finish()
        assert [(w.word, round(w.start * 12.5), round(w.end * 12.5)) for w in expected] == got


def assert_same_words(words: list[dict], expected: list) -> None:
    """The server's words are transcribe's: the stream goes on past transcribe's end (the client's silence
    until its Marker comes back), so later words may follow, and the last one may have grown a piece."""
    texts = [w["text"] for w in words]
    assert len(expected) > 3 and len(texts) >= len(expected)
    assert texts[:len(expected) - 1] == [w.word for w in expected[:-1]]
    assert texts[len(expected) - 1].startswith(expected[-1].word)


def test_asr_words_equal_transcribe(asr_server, stt_bundle, speech_files):
    bundle = stt_bundle
    wav = read_speech(speech_files[0], 3.0)[0]
    expected = transcribe_recordings(bundle, [wav[None]])[0]
    flush = SttSettings.from_config(bundle.config).flush_samples(SR) / SR
    messages = asyncio.run(transcribe_over_ws(asr_server.ws_base + "/api/asr-streaming", wav.numpy(), flush))
    kinds = [m["type"] for m in messages]
    assert kinds[0] == "Ready" and kinds[-1] == "Marker" and messages[-1]["id"] == 7, messages[-1]
    assert "Error" not in kinds
    words = [m for m in messages if m["type"] == "Word"]
    assert_same_words(words, expected.words)
    # transcribe clips times to the recording's length; the server's stream has no known end
    duration = len(wav) / SR
    assert [min(w["start_time"], duration) for w in words[:len(expected.words)]] == \
        pytest.approx([w.start for w in expected.words], abs=1e-6)
    ends = [m["stop_time"] for m in messages if m["type"] == "EndWord"]
    assert len(ends) == len(words) and all(e >= w["start_time"] for e, w in zip(ends, words))
    steps = [m for m in messages if m["type"] == "Step"]
    assert [s["step_idx"] for s in steps] == list(range(len(steps)))
    assert len(steps) >= (len(wav) + flush * SR) // FRAME  # one per frame of audio, up to the marker
    assert all(len(s["prs"]) == 4 and all(0 <= p <= 1 for p in s["prs"]) for s in steps)


def test_asr_two_clients_at_once(asr_server, stt_bundle, speech_files):
    bundle = stt_bundle
    wavs = [read_speech(path, 2.0)[0] for path in speech_files[1:3]]
    expected = transcribe_recordings(bundle, [w[None] for w in wavs])
    flush = SttSettings.from_config(bundle.config).flush_samples(SR) / SR
    url = asr_server.ws_base + "/api/asr-streaming"

    async def both():
        # different chunk sizes: the frames of the two sessions arrive at different times
        return await asyncio.gather(transcribe_over_ws(url, wavs[0].numpy(), flush, chunk=4000),
                                    transcribe_over_ws(url, wavs[1].numpy(), flush, chunk=SR))

    metrics = asr_server.engine.metrics
    steps, frames = metrics.steps, metrics.frames_in
    for messages, result in zip(asyncio.run(both()), expected):
        assert_same_words([m for m in messages if m["type"] == "Word"], result.words)
    assert metrics.frames_in - frames > metrics.steps - steps  # batched: some steps served both sessions


def test_asr_takes_ogg_opus_audio(asr_server, stt_bundle, speech_files):
    """OggOpus messages (pages split anywhere, data as bin or as a list of byte values) give the words of the
    decoded audio; Init is accepted; bad Opus data gets an Error and the stream restarts cleanly."""
    from openmoshi.audio.opus import decode_ogg_opus, encode_ogg_opus
    wav = read_speech(speech_files[0], 3.0)[0].numpy()
    stream = encode_ogg_opus(wav)
    expected = transcribe_recordings(stt_bundle, [torch.from_numpy(decode_ogg_opus(stream))[None]])[0]
    flush = SttSettings.from_config(stt_bundle.config).flush_samples(SR) / SR
    url = asr_server.ws_base + "/api/asr-streaming"

    async def run() -> list[dict]:
        out = []
        async with aiohttp.ClientSession() as http, http.ws_connect(url, headers=KEY) as ws:
            await ws.send_bytes(pack({"type": "Init"}))
            for i in range(0, len(stream), 777):
                data = stream[i:i + 777]
                await ws.send_bytes(pack({"type": "OggOpus", "data": data if i % 2 else list(data)}))
            await ws.send_bytes(pack({"type": "Audio", "pcm": [0.0] * int(flush * SR)}))
            await ws.send_bytes(pack({"type": "Marker", "id": 3}))
            await ws.send_bytes(pack({"type": "OggOpus", "data": b"OggS" + bytes(60)}))
            await ws.send_bytes(pack({"type": "OggOpus", "data": [300]}))
            for _ in range(10):
                await ws.send_bytes(pack({"type": "Audio", "pcm": [0.0] * SR}))
            async for message in ws:
                out.append(msgpack.unpackb(message.data, raw=False))
                kinds = [m["type"] for m in out]
                if "Marker" in kinds and kinds.count("Error") == 2:
                    break
        return out

    messages = asyncio.run(run())
    assert messages[0]["type"] == "Ready"
    assert_same_words([m for m in messages if m["type"] == "Word"], expected.words)
    errors = [m["message"] for m in messages if m["type"] == "Error"]
    assert len(errors) == 2 and "bad message" in errors[0] and "list of 0..255" in errors[1], errors


async def _one_message(url: str, headers: dict | None, *messages) -> list:
    out = []
    async with aiohttp.ClientSession() as http, http.ws_connect(url, headers=headers) as ws:
        for message in messages:
            if isinstance(message, str):
                await ws.send_str(message)
            else:
                await ws.send_bytes(message)
        async for message in ws:
            data = msgpack.unpackb(message.data, raw=False)
            out.append(data)
            if len([m for m in out if m["type"] == "Error"]) == len(messages):
                break
    return out


def test_asr_bad_messages_get_clear_errors(asr_server):
    url = asr_server.ws_base + "/api/asr-streaming"
    bad = [b"\xc1not msgpack", pack([1, 2]), pack({"type": "Hello"}), pack({"type": "Audio"}),
           pack({"type": "Audio", "pcm": ["a", "b"]}), pack({"type": "Marker", "id": "x"}), "text frame"]
    out = asyncio.run(_one_message(url, KEY, *bad))
    errors = [m["message"] for m in out if m["type"] == "Error"]
    assert out[0]["type"] == "Ready" and len(errors) == len(bad)
    for error, needle in zip(errors, ["not a msgpack message", "expected a msgpack map", "unknown message type",
                                      "needs \"pcm\"", "numbers only", "must be an integer", "binary msgpack"]):
        assert needle in error, error
    assert asr_server.engine.metrics.protocol_errors >= len(bad)


def test_asr_token_in_header_or_query(asr_server):
    url = asr_server.ws_base + "/api/asr-streaming"

    async def status(target: str, headers: dict | None) -> int:
        async with aiohttp.ClientSession() as http:
            try:
                async with http.ws_connect(target, headers=headers):
                    return 101
            except aiohttp.WSServerHandshakeError as exc:
                return exc.status

    assert asyncio.run(status(url, None)) == 401
    assert asyncio.run(status(url, {"kyutai-api-key": "wrong"})) == 401
    assert asyncio.run(status(url + "?auth_id=secret", None)) == 101
    assert asyncio.run(status(asr_server.ws_base + "/api/tts_streaming", KEY)) == 404


def test_chat_on_an_stt_model_says_where_to_go(asr_server):
    async def chat() -> bytes:
        async with aiohttp.ClientSession() as http, http.ws_connect(asr_server.url, headers=KEY) as ws:
            message = await ws.receive()
            return message.data

    data = asyncio.run(chat())
    assert data[0] == 5 and b"/api/asr-streaming" in data


def test_health_and_metrics_of_a_dsm_server(asr_server, tts_server):
    for server in (asr_server, tts_server):
        with urllib.request.urlopen(server.http + "/health", timeout=10) as response:
            assert b'"ok"' in response.read()
        request = urllib.request.Request(server.http + "/metrics", headers=KEY)
        with urllib.request.urlopen(request, timeout=10) as response:
            assert b"openmoshi_ready 1" in response.read()


async def speak_over_ws(url: str, text: str, headers: dict | None = None) -> tuple[np.ndarray, list[dict], list]:
    """As Kyutai's tts_rust_server client: one Text message per word, Eos, audio until the server closes."""
    pcm, words, others = [], [], []
    async with aiohttp.ClientSession() as http, http.ws_connect(url, headers=headers or KEY) as ws:
        for word in text.split():
            await ws.send_bytes(pack({"type": "Text", "text": word}))
        await ws.send_bytes(pack({"type": "Eos"}))
        async for message in ws:
            data = msgpack.unpackb(message.data, raw=False)
            if data["type"] == "Audio":
                pcm.append(np.asarray(data["pcm"], dtype=np.float32))
            elif data["type"] == "Text":
                words.append(data)
            else:
                others.append(data)
    return (np.concatenate(pcm) if pcm else np.zeros(0, np.float32)), words, others


TEXT = "Hello there, how are you?"


def _speak(bundle, voice_file, temp: float, seed: int | None = None, cfg: float = 2.0):
    synth = Synthesizer(bundle, temp=temp, cfg_coef=cfg, max_steps=int(300 * 12.5), seed=seed)
    return synth.speak([[TEXT]], [voice_condition(str(voice_file))])[0]


def test_tts_audio_equals_speak(tts_server, tts_bundle, voices):
    base = tts_server.ws_base + "/api/tts_streaming?format=PcmMessagePack"
    expected = _speak(tts_bundle, voices / "expresso" / "happy.wav.1e68beda@240.safetensors", 0.0)
    pcm, words, others = asyncio.run(speak_over_ws(base + "&voice=expresso%2Fhappy.wav", TEXT))
    assert [m["type"] for m in others] == ["Ready"]
    assert len(pcm) == expected.audio.shape[-1] and len(pcm) % FRAME == 0
    # the same tokens; the codec decodes them in a batch of 2 rows here, hence float rounding (1e-7)
    np.testing.assert_allclose(pcm, expected.audio[0].numpy(), rtol=0, atol=1e-5)
    assert [(w["text"], w["start_s"], w["stop_s"]) for w in words] == \
        [(w.word, pytest.approx(w.start, abs=1e-6), pytest.approx(w.end, abs=1e-6)) for w in expected.words]
    # sampling with a seed is reproducible as well; the default voice is used when none is named
    expected = _speak(tts_bundle, voices / "other.safetensors", 0.7, seed=11, cfg=3.0)
    pcm, _, _ = asyncio.run(speak_over_ws(base + "&voice=other&temperature=0.7&seed=11&cfg_alpha=3", TEXT))
    np.testing.assert_allclose(pcm, expected.audio[0].numpy(), rtol=0, atol=1e-5)


def test_tts_two_clients_at_once(tts_server):
    url = tts_server.ws_base + "/api/tts_streaming"

    async def both():
        return await asyncio.gather(speak_over_ws(url, TEXT), speak_over_ws(url, "Good morning to you."))

    metrics = tts_server.engine.metrics
    steps, frames = metrics.steps, metrics.frames_in
    (first, w1, _), (second, w2, _) = asyncio.run(both())
    assert [w["text"] for w in w1] == TEXT.split() and [w["text"] for w in w2] == ["Good", "morning", "to", "you."]
    assert metrics.frames_in - frames > metrics.steps - steps  # batched: some steps served both sessions
    alone, _, _ = asyncio.run(speak_over_ws(url, "Good morning to you."))
    np.testing.assert_allclose(second, alone, rtol=0, atol=1e-5)
    assert len(first) > 0


def test_tts_bad_requests_and_messages(tts_server):
    url = tts_server.ws_base + "/api/tts_streaming"
    for query, needle in [("?voice=..%2Fsecret", "inside the voice folder"), ("?voice=nobody", "no voice"),
                          ("?format=Wav", "PcmMessagePack"), ("?temperature=hot", "not a number"),
                          ("?cfg_alpha=2.2", "distilled")]:
        out = asyncio.run(_one_message(url + query, KEY))
        assert out and out[0]["type"] == "Error" and needle in out[0]["message"], (query, out)
    out = asyncio.run(_one_message(url, KEY, pack({"type": "Audio", "pcm": []}), pack({"type": "Text"}),
                                   pack({"type": "Text", "text": 3})))
    errors = [m["message"] for m in out if m["type"] == "Error"]
    assert "accepts Text, Eos" in errors[0] and "needs \"text\"" in errors[1] and "must be a string" in errors[2]


def test_tts_idle_client_is_closed(tiny_tts, voices):
    limits = SessionLimits(max_message_bytes=1 << 20, idle_timeout_s=0.5)
    options = TtsOptions(voice_dir=voices, default_voice="other")
    with RunningServer(tiny_tts, max_sessions=1, limits=limits, tts_options=options) as server:
        out = asyncio.run(_one_message(server.ws_base + "/api/tts_streaming", None,
                                       pack({"type": "Text", "text": "Hello"})))
    assert out[0]["type"] == "Ready" and "idle timeout" in out[-1]["message"]


def test_asr_message_size_limit_and_busy(tiny_stt):
    limits = SessionLimits(max_message_bytes=64 * 1024, idle_timeout_s=5.0)
    with RunningServer(tiny_stt, max_sessions=1, limits=limits) as server:
        url = server.ws_base + "/api/asr-streaming"

        async def run() -> tuple[list, list]:
            async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
                ready = msgpack.unpackb((await ws.receive()).data)
                busy = await _one_message(url, None)  # the only slot is taken
                # 13,104 float32 samples: 65,539 bytes, over the limit (Kyutai's file client needs the default
                # 1 MiB of `serve` for stt models): the connection is closed with "message too big" (1009)
                await ws.send_bytes(pack({"type": "Audio", "pcm": [0.0] * 13_104}))
                closed = await ws.receive()
            return ready, busy, closed

        ready, busy, closed = asyncio.run(run())
    assert ready["type"] == "Ready" and busy[0]["type"] == "Error" and "server busy" in busy[0]["message"]
    assert closed.type == aiohttp.WSMsgType.CLOSE and closed.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG


def _serve(args: list[str]):
    """`openmoshi serve` as a subprocess on a free port: (process, ws://host:port)."""
    import os
    import re
    import subprocess
    import sys

    from conftest import REPO
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "openmoshi", "serve", "--device", "cpu", "--port", "0",
                             "--threads", "1", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=REPO)
    line = proc.stdout.readline()
    match = re.search(r"on http://127\.0\.0\.1:(\d+)/", line)
    if not match:
        proc.kill()
        raise AssertionError((line, proc.stderr.read()))
    return proc, f"ws://127.0.0.1:{match.group(1)}"


def test_serve_command_picks_the_endpoint_from_the_model(tiny_stt, tiny_tts, voices, speech_files):
    # As Kyutai's scripts: the kyutai-api-key header, a second of audio per message (~120 KB), the default
    # voice name of tts_rust_server.py (here a file of --voice-dir with Kyutai's suffix).
    (voices / "expresso" / "ex03-ex01_happy_001_channel1_334s.wav.1e68beda@240.safetensors").write_bytes(
        (voices / "other.safetensors").read_bytes())
    headers = {"kyutai-api-key": "public_token"}
    proc, base = _serve(["--model", str(tiny_stt), "--token", "public_token"])
    try:
        wav = read_speech(speech_files[0], 2.0)[0].numpy()
        messages = asyncio.run(transcribe_over_ws(base + "/api/asr-streaming", wav, 1.5, chunk=SR, headers=headers))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert messages[0]["type"] == "Ready" and messages[-1]["type"] == "Marker"
    assert any(m["type"] == "Word" for m in messages)
    proc, base = _serve(["--model", str(tiny_tts), "--token", "public_token", "--voice-dir", str(voices)])
    try:
        query = "?voice=expresso%2Fex03-ex01_happy_001_channel1_334s.wav&format=PcmMessagePack"
        pcm, words, others = asyncio.run(speak_over_ws(base + "/api/tts_streaming" + query, TEXT, headers))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert [m["type"] for m in others] == ["Ready"] and [w["text"] for w in words] == TEXT.split()
    assert len(pcm) > SR


def test_asr_idle_client_is_closed(tiny_stt):
    limits = SessionLimits(max_message_bytes=1 << 20, idle_timeout_s=0.5)
    with RunningServer(tiny_stt, max_sessions=1, limits=limits) as server:
        out = asyncio.run(_one_message(server.ws_base + "/api/asr-streaming", None,
                                       pack({"type": "Audio", "pcm": [0.0] * FRAME})))
        for _ in range(100):  # the slot is free again once the close handshake is over
            if server.engine.active_sessions == 0:
                break
            time.sleep(0.02)
        assert server.engine.active_sessions == 0
    assert out[0]["type"] == "Ready" and "idle timeout" in out[-1]["message"]
