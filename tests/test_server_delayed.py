"""`openmoshi serve` with Moshi-style models made ASR or TTS by their delays (paper §5.7): the DSM websockets
(/api/asr-streaming, /api/tts_streaming) give the words of `openmoshi transcribe` and the audio and words of
`openmoshi speak` (greedy), through the real websocket, alone and batched."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import aiohttp
import numpy as np
import pytest
import soundfile as sf
from conftest import init_preset, read_speech
from test_server_dsm import (
    KEY,
    LIMITS,
    SR,
    _one_message,
    _serve,
    assert_same_words,
    speak_over_ws,
    transcribe_over_ws,
)

from openmoshi.bundle import load_model
from openmoshi.checkpoint import read_safetensors, save_safetensors
from openmoshi.cli.main import main
from openmoshi.generation.delayed import DelayedSynthesizer, DelayedTranscriber
from openmoshi.generation.stt import transcribe_recordings
from openmoshi.server.background import RunningServer
from openmoshi.server.tts import TtsOptions

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TEXT = "Hello there, how are you?"


def _sharpen(folder):
    """Output heads scaled up (as tests/test_delayed.py): greedy text with wide margins, not all padding."""
    path = folder / "model.safetensors"
    state = read_safetensors(path)
    for name in state:
        if name == "text_linear.weight" or (name.startswith("linears.") and name.endswith(".weight")):
            state[name] = state[name] * 12
    save_safetensors(state, path)
    return folder


@pytest.fixture(scope="module")
def moshi_asr(tmp_path_factory):
    return _sharpen(init_preset(tmp_path_factory.mktemp("asr") / "asr", "tiny-moshi-asr", 1))


@pytest.fixture(scope="module")
def moshi_tts(tmp_path_factory):
    return init_preset(tmp_path_factory.mktemp("tts") / "tts", "tiny-moshi-tts", 2)


def _flush_s(bundle) -> float:
    return DelayedTranscriber(bundle).flush_samples() / SR


def _same_words(messages: list[dict], expected, duration: float) -> None:
    """The server's words and start times are transcribe's (`assert_same_words`: the client's silence after the
    flush may add words, or a piece to the last one; transcribe clips times to the recording)."""
    words = [m for m in messages if m["type"] == "Word"]
    assert_same_words(words, expected)
    assert [min(w["start_time"], duration) for w in words[:len(expected)]] == \
        pytest.approx([w.start for w in expected], abs=1e-6)


async def _first_chat_message(url: str) -> bytes:
    async with aiohttp.ClientSession() as http, http.ws_connect(url, headers=KEY) as ws:
        return (await ws.receive()).data


def test_asr_model_on_the_asr_websocket(moshi_asr, speech_files):
    bundle = load_model(moshi_asr)
    wavs = [read_speech(path, 2.0)[0] for path in speech_files[:2]]
    expected = transcribe_recordings(bundle, [w[None] for w in wavs])
    flush = _flush_s(bundle)
    with RunningServer(moshi_asr, max_sessions=2, token="secret", limits=LIMITS) as server:
        url = server.ws_base + "/api/asr-streaming"
        alone = asyncio.run(transcribe_over_ws(url, wavs[0].numpy(), flush))

        async def both():  # different chunk sizes: the sessions' frames arrive at different times
            return await asyncio.gather(transcribe_over_ws(url, wavs[0].numpy(), flush, chunk=4000),
                                        transcribe_over_ws(url, wavs[1].numpy(), flush, chunk=SR))

        metrics = server.engine.metrics
        steps, frames = metrics.steps, metrics.frames_in
        together = asyncio.run(both())
        batched = metrics.frames_in - frames > metrics.steps - steps
        chat = asyncio.run(_first_chat_message(server.url))
    assert alone[0]["type"] == "Ready" and alone[-1] == {"type": "Marker", "id": 7}
    assert "Error" not in [m["type"] for m in alone]
    _same_words(alone, expected[0].words, wavs[0].shape[-1] / SR)
    for messages, result, wav in zip(together, expected, wavs):
        _same_words(messages, result.words, wav.shape[-1] / SR)
    assert batched  # some steps served both sessions
    assert chat[0] == 5 and b"/api/asr-streaming" in chat  # /api/chat says where to go


def test_tts_model_on_the_tts_websocket(moshi_tts):
    bundle = load_model(moshi_tts)
    expected = DelayedSynthesizer(bundle, temp=0.0, max_steps=int(300 * 12.5)).speak([TEXT])[0]
    assert expected.finished
    options = TtsOptions(temperature=0.0)
    with RunningServer(moshi_tts, max_sessions=2, token="secret", limits=LIMITS, tts_options=options) as server:
        url = server.ws_base + "/api/tts_streaming"
        pcm, words, others = asyncio.run(speak_over_ws(url, TEXT))

        async def both():
            return await asyncio.gather(speak_over_ws(url, TEXT), speak_over_ws(url, "Good morning to you."))

        (first, _, _), (second, w2, _) = asyncio.run(both())
        bad = [asyncio.run(_one_message(url + query, KEY)) for query in ("?voice=other", "?cfg_alpha=2")]
    assert [m["type"] for m in others] == ["Ready"]
    assert len(pcm) == expected.audio.shape[-1]
    np.testing.assert_allclose(pcm, expected.audio[0].numpy(), rtol=0, atol=1e-5)
    assert [(w["text"], w["start_s"], w["stop_s"]) for w in words] == \
        [(w.word, pytest.approx(w.start, abs=1e-6), pytest.approx(w.end, abs=1e-6)) for w in expected.words]
    np.testing.assert_allclose(first, pcm, rtol=0, atol=1e-5)
    assert [w["text"] for w in w2] == ["Good", "morning", "to", "you."] and len(second) > 0
    assert "own voice" in bad[0][0]["message"] and "no conditions to guide" in bad[1][0]["message"]


def test_serve_command_equals_the_transcribe_and_speak_commands(moshi_asr, moshi_tts, speech_files, tmp_path):
    """`openmoshi serve` picks the endpoint from the delays; what its websockets give equals the files written by
    `openmoshi transcribe` and `openmoshi speak --temp 0`."""
    path = tmp_path / "in.wav"
    sf.write(path, read_speech(speech_files[0], 2.0)[0].numpy(), SR)
    assert main(["transcribe", "--model", str(moshi_asr), str(path), "--out", str(tmp_path), "--format", "json",
                 "--quiet", "--threads", "1"]) == 0
    transcript = json.loads((tmp_path / "in.json").read_text())
    out = tmp_path / "hello.wav"
    assert main(["speak", "--model", str(moshi_tts), TEXT, "--out", str(out), "--temp", "0", "--quiet",
                 "--threads", "1"]) == 0
    spoken, timings = sf.read(out, dtype="float32")[0], json.loads(out.with_suffix(".json").read_text())

    proc, base = _serve(["--model", str(moshi_asr), "--token", "public_token"])
    try:
        wav = sf.read(path, dtype="float32")[0]
        flush = _flush_s(load_model(moshi_asr))
        headers = {"kyutai-api-key": "public_token"}
        messages = asyncio.run(transcribe_over_ws(base + "/api/asr-streaming", wav, flush, chunk=SR,
                                                  headers=headers))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    words = [m for m in messages if m["type"] == "Word"]
    assert_same_words(words, [SimpleNamespace(word=w["word"]) for w in transcript["words"]])
    assert [min(w["start_time"], transcript["duration"]) for w in words[:len(transcript["words"])]] == \
        pytest.approx([w["start"] for w in transcript["words"]], abs=1e-6)

    proc, base = _serve(["--model", str(moshi_tts), "--tts-temp", "0"])
    try:
        pcm, got, others = asyncio.run(speak_over_ws(base + "/api/tts_streaming?format=PcmMessagePack", TEXT, {}))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert [m["type"] for m in others] == ["Ready"] and len(pcm) == len(spoken)
    np.testing.assert_allclose(pcm, spoken, rtol=0, atol=1.5 / 32768)  # the wav file holds 16-bit samples
    assert [(w["text"], w["start_s"], w["stop_s"]) for w in got] == \
        [(w["word"], pytest.approx(w["start"], abs=1e-6), pytest.approx(w["end"], abs=1e-6))
         for w in timings["words"]]
