"""/api/tts_streaming's sampling and speaker query parameters, named as Kyutai's rust moshi-server names them
(top_k, max_seq_len, voices, with temperature, seed, cfg_alpha): each changes the speech as `openmoshi speak`
(`Synthesizer`) with the same settings would, a bad value gets a clear Error, and the server serves on."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import quote

import aiohttp
import msgpack
import numpy as np
import pytest
import torch
from test_server_dsm import KEY, LIMITS, TEXT, _one_message, speak_over_ws
from test_server_tts_formats import speak

from openmoshi.bundle import load_model
from openmoshi.checkpoint import save_safetensors
from openmoshi.generation.tts import Synthesizer, voices_condition
from openmoshi.server.background import RunningServer
from openmoshi.server.tts import TtsOptions

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MAX_STEPS = int(300 * 12.5)  # the server's default limit (--max-speech-seconds 300)


@pytest.fixture(scope="module")
def tts_dir(tmp_path_factory):
    from conftest import init_preset
    return init_preset(tmp_path_factory.mktemp("tts") / "tiny-tts", "tiny-tts", 5)


@pytest.fixture(scope="module")
def voices(tmp_path_factory):
    folder = tmp_path_factory.mktemp("voices")
    gen = torch.Generator().manual_seed(1)
    for name in ("a", "b", "c", "d", "e", "f"):
        save_safetensors({"speaker_wavs": torch.randn(1, 32, 5, generator=gen)}, folder / f"{name}.safetensors")
    save_safetensors({"speaker_wavs": torch.randn(1, 32, 7, generator=gen)}, folder / "long.safetensors")
    return folder


@pytest.fixture(scope="module")
def server(tts_dir, voices):
    options = TtsOptions(voice_dir=voices, default_voice="a", temperature=0.0)
    with RunningServer(tts_dir, max_sessions=2, token="secret", limits=LIMITS, tts_options=options) as running:
        yield running


@pytest.fixture(scope="module")
def bundle(tts_dir):
    return load_model(tts_dir)


def _speak(bundle, voices: list, **kwargs):
    synth = Synthesizer(bundle, cfg_coef=2.0, max_steps=kwargs.pop("max_steps", MAX_STEPS), **kwargs)
    return synth.speak([[TEXT]], [voices_condition([str(v) for v in voices])])[0]


def _url(server, query: str) -> str:
    return server.ws_base + "/api/tts_streaming?format=PcmMessagePack&" + query


def test_top_k_samples_among_the_k_likeliest(server, bundle, voices):
    a = voices / "a.safetensors"
    for k in (3, 40):
        expected = _speak(bundle, [a], temp=0.8, seed=5, top_k=k)
        pcm, _, _ = asyncio.run(speak_over_ws(_url(server, f"temperature=0.8&seed=5&top_k={k}"), TEXT))
        np.testing.assert_allclose(pcm, expected.audio[0].numpy(), rtol=0, atol=1e-5)
    wide, _, _ = asyncio.run(speak_over_ws(_url(server, "temperature=0.8&seed=5"), TEXT))  # Kyutai's 250
    assert len(wide) != len(pcm) or not np.allclose(wide, pcm, atol=1e-5)
    # as Kyutai's server: top_k 0 or 1 is greedy, whatever the temperature
    greedy = _speak(bundle, [a], temp=0.0)
    for k in (0, 1):
        pcm, _, _ = asyncio.run(speak_over_ws(_url(server, f"temperature=0.8&seed=5&top_k={k}"), TEXT))
        np.testing.assert_allclose(pcm, greedy.audio[0].numpy(), rtol=0, atol=1e-5)


async def _speak_until_closed(url: str, text: str) -> tuple[np.ndarray, list, list, aiohttp.WSMessage]:
    frames, message = await speak(url, text)
    pcm, words, others = [], [], []
    for data in map(msgpack.unpackb, frames):
        (pcm.append(np.asarray(data["pcm"], np.float32)) if data["type"] == "Audio" else
         words.append(data) if data["type"] == "Text" else others.append(data))
    return np.concatenate(pcm) if pcm else np.zeros(0, np.float32), words, others, message


def test_max_seq_len_bounds_the_speech_with_a_clear_end(server, bundle, voices):
    full = _speak(bundle, [voices / "a.safetensors"], temp=0.0)
    n = 40
    expected = _speak(bundle, [voices / "a.safetensors"], temp=0.0, max_steps=n)
    assert not expected.finished and 0 < expected.audio.shape[-1] < full.audio.shape[-1]
    pcm, words, others, close = asyncio.run(_speak_until_closed(_url(server, f"max_seq_len={n}"), TEXT))
    np.testing.assert_allclose(pcm, expected.audio[0].numpy(), rtol=0, atol=1e-5)
    assert [w["text"] for w in words] == [w.word for w in expected.words]
    # a normal close (the client's own limit), no Error message; the close frame says why
    assert [m["type"] for m in others] == ["Ready"]
    assert close.type == aiohttp.WSMsgType.CLOSE and close.data == 1000
    assert f"max_seq_len={n} steps" in close.extra and "before the end of the text" in close.extra
    # a limit the speech does not reach changes nothing
    pcm, _, _, close = asyncio.run(_speak_until_closed(_url(server, f"max_seq_len={MAX_STEPS}"), TEXT))
    np.testing.assert_allclose(pcm, full.audio[0].numpy(), rtol=0, atol=1e-5)
    assert close.data == 1000 and not close.extra


def test_voices_fill_one_speaker_slot_each(server, bundle, voices):
    names = ["b", "c"]
    expected = _speak(bundle, [voices / f"{n}.safetensors" for n in names], temp=0.0)
    alone = _speak(bundle, [voices / "b.safetensors"], temp=0.0)
    for query in ("voices=b&voices=c", "voices=" + quote(json.dumps(names))):
        pcm, words, _ = asyncio.run(speak_over_ws(_url(server, query), TEXT))
        np.testing.assert_allclose(pcm, expected.audio[0].numpy(), rtol=0, atol=1e-5)
        assert [w["text"] for w in words] == TEXT.split()
    assert len(alone.audio[0]) != len(expected.audio[0]) or not torch.allclose(alone.audio, expected.audio)
    pcm, _, _ = asyncio.run(speak_over_ws(_url(server, "voices=b"), TEXT))  # one voice: as voice=b
    np.testing.assert_allclose(pcm, alone.audio[0].numpy(), rtol=0, atol=1e-5)


BAD = [
    ("top_k=-1", "top_k='-1' is not a whole number"), ("top_k=ten", "not a whole number"),
    ("top_k=2000000", "outside [0, 1000000]"),
    ("max_seq_len=0", "outside [1,"), ("max_seq_len=12.5", "not a whole number"),
    ("max_seq_len=100000", "over this server's limit of 3750 steps"),
    ("seed=-3", "not a whole number"), (f"seed={2**64}", "outside [0, 18446744073709551615]"),
    ("temperature=nan", "outside [0, 10]"), ("cfg_alpha=-1", "outside [0, 20]"),
    ("voice=a&voices=b", "either `voice` or `voices`"),
    ("voices=a&voices=b&voices=c&voices=d&voices=e&voices=f", "6 voices: the model has 5 speaker slots"),
    ("voices=%5B1%2C2%5D", "must list voice names"), ("voices=%5Bbad", "not a JSON list"),
    ("voices=a&voices=long", "same length"), ("voices=a&voices=nobody", "no voice 'nobody'"),
    ("voices=a&voices=", "an empty name"),
]


def test_bad_values_get_a_clear_error_and_the_server_serves_on(server):
    async def run() -> tuple:
        # a session speaking while others are refused
        speaking = asyncio.create_task(speak_over_ws(_url(server, "voice=a"), TEXT))
        refused = [await _one_message(_url(server, query), KEY) for query, _ in BAD]
        return await speaking, refused

    (pcm, words, _), refused = asyncio.run(run())
    for (query, needle), out in zip(BAD, refused):
        assert out and out[0]["type"] == "Error" and needle in out[0]["message"], (query, out)
    assert len(pcm) > 0 and [w["text"] for w in words] == TEXT.split()
    pcm, words, _ = asyncio.run(speak_over_ws(_url(server, "voice=a"), "Hello you."))
    assert len(pcm) > 0 and [w["text"] for w in words] == ["Hello", "you."]


def test_a_seed_of_64_bits_works(server, bundle, voices):
    seed = 2**64 - 1  # Kyutai's server reads the seed as an unsigned 64-bit integer
    pcm, _, _ = asyncio.run(speak_over_ws(_url(server, f"temperature=0.8&seed={seed}"), TEXT))
    again, _, _ = asyncio.run(speak_over_ws(_url(server, f"temperature=0.8&seed={seed}"), TEXT))
    np.testing.assert_array_equal(pcm, again)


async def _speak_with_voice(url: str, voice: dict, text: str, after_first_word: bool = False) -> tuple:
    """As Kyutai's clients with an inline voice: a Voice message, then one Text per word, Eos; the audio, the
    words and the other messages until the server closes."""
    pcm, words, others = [], [], []
    async with aiohttp.ClientSession() as http, http.ws_connect(url, headers=KEY) as ws:
        for i, word in enumerate(text.split()):
            if i == int(after_first_word):
                await ws.send_bytes(msgpack.packb({"type": "Voice", **voice}))
            await ws.send_bytes(msgpack.packb({"type": "Text", "text": word}))
        await ws.send_bytes(msgpack.packb({"type": "Eos"}))
        async for message in ws:
            data = msgpack.unpackb(message.data, raw=False)
            (pcm.append(np.asarray(data["pcm"], np.float32)) if data["type"] == "Audio" else
             words.append(data) if data["type"] == "Text" else others.append(data))
    return np.concatenate(pcm) if pcm else np.zeros(0, np.float32), words, others


def _voice_message(path) -> dict:
    from openmoshi.checkpoint import read_safetensors
    emb = read_safetensors(path)["speaker_wavs"]
    return {"embeddings": emb.reshape(-1).tolist(), "shape": list(emb.shape)}


def test_an_inline_voice_message_sets_the_voice(server, bundle, voices):
    """Kyutai's server takes a voice as embeddings in a Voice message before the first Text: the same speech
    as that voice named in the query."""
    b = voices / "b.safetensors"
    expected = _speak(bundle, [b], temp=0.0)
    pcm, words, others = asyncio.run(_speak_with_voice(_url(server, ""), _voice_message(b), TEXT))
    assert [m["type"] for m in others] == ["Ready"]
    np.testing.assert_allclose(pcm, expected.audio[0].numpy(), rtol=0, atol=1e-5)
    assert [w["text"] for w in words] == TEXT.split()
    default = _speak(bundle, [voices / "a.safetensors"], temp=0.0)  # the server's --voice
    assert len(default.audio[0]) != len(pcm) or not np.allclose(default.audio[0].numpy(), pcm, atol=1e-5)


VOICE_BAD = [
    ({"embeddings": [0.5] * 20, "shape": [1, 4, 5]}, "this model's voices are [1, 32, frames]"),
    ({"embeddings": [0.5] * 32 * 7, "shape": [1, 32, 7]}, "same length"),
    ({"embeddings": [0.5] * 10, "shape": [1, 32, 5]}, "holds 10 numbers, its shape [1, 32, 5] needs 160"),
    ({"embeddings": [0.5] * 160, "shape": [32, 5]}, "must be [1, dim, frames]"),
    ({"embeddings": ["x"] * 160, "shape": [1, 32, 5]}, "numbers only"),
    ({"embeddings": [0.5] * 160}, "needs \"shape\""),
]


def test_a_bad_or_late_voice_message_gets_an_error_and_the_speech_goes_on(server, bundle, voices):
    default = _speak(bundle, [voices / "a.safetensors"], temp=0.0).audio[0].numpy()
    for voice, needle in VOICE_BAD:
        pcm, words, others = asyncio.run(_speak_with_voice(_url(server, ""), voice, TEXT))
        errors = [m["message"] for m in others if m["type"] == "Error"]
        assert len(errors) == 1 and needle in errors[0], (voice, errors)
        np.testing.assert_allclose(pcm, default, rtol=0, atol=1e-5)
    late = _voice_message(voices / "b.safetensors")
    pcm, words, others = asyncio.run(_speak_with_voice(_url(server, ""), late, TEXT, after_first_word=True))
    errors = [m["message"] for m in others if m["type"] == "Error"]
    assert len(errors) == 1 and "before the first word" in errors[0]
    np.testing.assert_allclose(pcm, default, rtol=0, atol=1e-5)
    assert [w["text"] for w in words] == TEXT.split()
