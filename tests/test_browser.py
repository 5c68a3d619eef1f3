"""The web page in a real browser: headless Chromium with a fake microphone talks to a tiny-model server."""

from __future__ import annotations

import asyncio
import threading

import aiohttp
import numpy as np
import pytest
from browser_utils import (
    console_errors,
    page_summary,
    require_browser,
    save_screenshot,
    start_chromium,
    wait_for,
    write_fake_mic,
)
from conftest import eventually

from openmoshi.bundle import init_model
from openmoshi.server.background import RunningServer

pytestmark = pytest.mark.slow

HOLD_S = 5.0  # seconds of Moshi's audio the page must have played before the checks


@pytest.fixture(scope="module")
def browser_paths():
    return require_browser()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return init_model("tiny", tmp_path_factory.mktemp("model") / "tiny", seed=5)


@pytest.fixture(scope="module")
def fake_mic(speech_files, tmp_path_factory):
    return write_fake_mic(speech_files[0], tmp_path_factory.mktemp("mic") / "speech48k.wav")


@pytest.fixture()
def chromium(browser_paths, fake_mic):
    driver = start_chromium(fake_mic, *browser_paths)
    try:
        yield driver
    finally:
        driver.quit()


def _open_page(driver, url: str) -> None:
    driver.get(url)
    wait_for(driver, "window.moshiDebug && document.body.dataset.state === 'idle'", 15, "the page to load")
    assert driver.find_element("id", "start").is_enabled(), page_summary(driver)


def _spy_on_user_audio(engine) -> list[np.ndarray]:
    """The microphone PCM (float32, 24 kHz) the server decoded from the page, as the engine gets it."""
    heard: list[np.ndarray] = []
    push = engine.push_audio

    def spy(slot, pcm):
        heard.append(np.array(pcm, dtype=np.float32))
        push(slot, pcm)

    engine.push_audio = spy  # the instance attribute shadows the method for the app's calls
    return heard


def _debug(driver) -> dict:
    return driver.execute_script("return JSON.parse(JSON.stringify(window.moshiDebug));")


def test_conversation_in_browser(chromium, tiny_model, tmp_path):
    with RunningServer(tiny_model, max_sessions=2) as srv:
        heard = _spy_on_user_audio(srv.engine)
        _open_page(chromium, srv.http + "/")
        chromium.find_element("id", "start").click()
        wait_for(chromium, "window.moshiDebug.state === 'connected' && "
                 "window.moshiDebug.detail.startsWith('live')", 20, "the conversation to go live")
        # Hold the conversation until Moshi's voice has been played for a few seconds and it said something.
        wait_for(chromium, f"window.moshiDebug.audio.secondsPlayed >= {HOLD_S}", 30,
                 f"{HOLD_S} s of played audio")
        wait_for(chromium, "document.getElementById('transcript').querySelector('.placeholder') === null",
                 10, "transcript text in the page")
        # Both level meters moved at some point (each is the RMS of the last 100 ms, so zero in a pause).
        wait_for(chromium, "window.moshiDebug.audio.micLevel > 0.01", 10, "the microphone meter")
        wait_for(chromium, "window.moshiDebug.audio.moshiLevel > 0.001", 10, "Moshi's meter")
        chromium.find_element("css selector", "#stats-panel summary").click()
        wait_for(chromium, "document.getElementById('stats').textContent.includes('Audio played')", 5,
                 "the stats")
        shot = save_screenshot(chromium, tmp_path, "browser-conversation")
        # One script runs atomically in the page: the counters and the DOM are read at the same instant.
        d, dom = chromium.execute_script(
            "const $ = (id) => document.getElementById(id);"
            "return [JSON.parse(JSON.stringify(window.moshiDebug)), {body: document.body.dataset.state,"
            " badge: $('state-badge').textContent, transcript: $('transcript').textContent,"
            " stop: !$('stop').disabled, start: !$('start').disabled, clock: $('clock').textContent}];")
        frames_in = srv.engine.metrics.frames_in

        # Still live, nothing went wrong.
        assert d["state"] == "connected", page_summary(chromium)
        assert d["lastError"] is None and d["protocolErrors"] == 0
        assert dom["body"] == "connected" and dom["badge"] == "connected"
        assert dom["stop"] and not dom["start"]
        assert dom["clock"] != "0:00"
        assert d["received"]["handshake"]["messages"] == 1 and d["received"]["error"]["messages"] == 0
        assert d["metadata"]["max_sessions"] == 2

        # Moshi's audio arrived (kind 1), was decoded and played.
        rate = d["audio"]["sampleRate"]
        assert rate in (16_000, 22_050, 24_000, 32_000, 44_100, 48_000, 96_000)
        assert d["received"]["audio"]["messages"] >= 20 and d["received"]["audio"]["bytes"] > 1000
        assert d["ogg"]["pages"] >= 20 and d["ogg"]["crcErrors"] == 0
        assert d["audio"]["samplesPlayed"] >= HOLD_S * rate
        # Every decoded sample went to the player (played, buffered or dropped as late), bar those in flight.
        audio = d["audio"]
        handed = audio["samplesPlayed"] + audio["samplesDropped"] + audio["bufferedMs"] * rate / 1000
        assert audio["samplesDecoded"] - 0.3 * rate <= handed <= audio["samplesDecoded"] + 1
        # The decoded audio tracks the server's output (one 80 ms frame per step), give or take the startup.
        assert d["audio"]["samplesDecoded"] / rate >= frames_in * 0.08 - 1.5

        # Moshi's words are shown: the DOM holds what the text messages carried.
        assert d["received"]["text"]["messages"] > 0
        assert d["transcript"].strip() and dom["transcript"].strip()
        assert dom["transcript"] == d["transcript"].lstrip()

        # The microphone reached the server: Ogg pages went out and the engine stepped on the decoded frames.
        assert d["sent"]["audio"]["messages"] >= 20 and d["sent"]["droppedAudioPages"] == 0
        assert frames_in >= HOLD_S / 0.08 * 0.8
        user = np.concatenate(heard)
        # The server decoded about as much microphone audio as the page sent (40 ms per page, 2 header pages).
        assert len(user) / 24_000 >= (d["sent"]["audio"]["messages"] - 2) * 0.04 - 0.5
        assert np.sqrt(np.mean(user**2)) > 0.01 and np.abs(user).max() > 0.1  # speech, not silence
        assert shot.stat().st_size > 10_000
        assert console_errors(chromium) == []

        # Stop: the page closes, keeps the recording, and the server frees the slot.
        chromium.find_element("id", "stop").click()
        wait_for(chromium, "window.moshiDebug.state === 'closed'", 10, "the conversation to stop")
        wait_for(chromium, "!document.getElementById('download').disabled", 5,
                 "the recording to be downloadable")
        assert _debug(chromium)["audio"]["recordedSeconds"] >= HOLD_S
        assert eventually(lambda: srv.engine.active_sessions == 0, 5)


class _HeldSession:
    """A raw websocket client holding one server slot (handshake received) until `release()`."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ready = threading.Event()
        self.first_kind: int | None = None
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._hold(),),
                                        daemon=True)

    async def _hold(self) -> None:
        self._stop = asyncio.Event()
        async with aiohttp.ClientSession() as session, session.ws_connect(self.url) as ws:
            self.first_kind = (await ws.receive(timeout=30)).data[0]
            self.ready.set()
            await self._stop.wait()

    def __enter__(self) -> _HeldSession:
        self._thread.start()
        if not self.ready.wait(30):
            raise RuntimeError("the holding client got no handshake")
        return self

    def release(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)

    def __exit__(self, *exc) -> None:
        self.release()


def test_busy_server_in_browser(chromium, tiny_model, tmp_path):
    with RunningServer(tiny_model, max_sessions=1) as srv, _HeldSession(srv.url) as holder:
        assert holder.first_kind == 0 and srv.engine.active_sessions == 1
        _open_page(chromium, srv.http + "/")
        chromium.find_element("id", "start").click()
        wait_for(chromium, "document.body.dataset.state === 'busy'", 20, "the busy state")
        shot = save_screenshot(chromium, tmp_path, "browser-busy")
        d = _debug(chromium)
        badge = chromium.find_element("id", "state-badge").text
        detail = chromium.find_element("id", "state-detail").text
        assert d["state"] == "busy" and d["received"]["error"]["messages"] == 1
        assert d["received"]["handshake"]["messages"] == 0 and d["received"]["audio"]["messages"] == 0
        assert "busy" in d["lastError"]
        assert badge == "server busy"
        assert "slot" in detail and "taken" in detail
        assert detail.lower().count("busy") == 1, detail  # said once, not "server busy: server busy: ..."
        assert chromium.find_element("id", "transcript").text == "Moshi's words will appear here."
        assert chromium.find_element("id", "start").is_enabled()  # the user can try again
        assert srv.engine.metrics.sessions_rejected == 1 and srv.engine.active_sessions == 1
        assert shot.stat().st_size > 10_000
        assert console_errors(chromium) == []

        # Once the slot is free, Start works from the same page.
        holder.release()
        assert eventually(lambda: srv.engine.active_sessions == 0, 5)
        chromium.find_element("id", "start").click()
        wait_for(chromium, "window.moshiDebug.state === 'connected'", 20, "a connection to the freed slot")
        wait_for(chromium, "window.moshiDebug.received.audio.messages > 0", 20, "audio from the freed slot")
        assert _debug(chromium)["received"]["error"]["messages"] == 0  # counters restart each conversation
        chromium.find_element("id", "stop").click()
        wait_for(chromium, "window.moshiDebug.state === 'closed'", 10, "the conversation to stop")


def test_conversation_in_browser_behind_token(chromium, tiny_model, tmp_path):
    """With --token the page URL carries it: the page, its assets (a cookie), the served model's sampling defaults
    and its websocket all work; the page's settings start from that model's config.json."""
    import json
    import shutil
    from urllib.parse import quote

    model = shutil.copytree(tiny_model, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config["lm_gen_config"] = {"temp": 0.65, "temp_text": 0.35, "top_k": 99, "top_k_text": 12}
    (model / "config.json").write_text(json.dumps(config))
    token = "tok&en#1 +é"
    with RunningServer(model, max_sessions=1, token=token) as srv:
        chromium.get(srv.http + "/")  # without the token: refused
        assert "token" in chromium.find_element("tag name", "body").text
        assert all("401" in e for e in console_errors(chromium))  # the refusal, and nothing else
        _open_page(chromium, srv.http + "/?token=" + quote(token, safe=""))
        wait_for(chromium, "document.getElementById('setting-text_temperature').value === '0.35'", 10,
                 "the model's defaults in the settings form")
        form = {name: chromium.find_element("id", f"setting-{name}").get_attribute("value")
                for name in ("audio_temperature", "audio_topk", "text_topk", "pad_mult")}
        assert form == {"audio_temperature": "0.65", "audio_topk": "99", "text_topk": "12", "pad_mult": "0"}
        chromium.find_element("id", "start").click()
        wait_for(chromium, "window.moshiDebug.state === 'connected' && "
                 "window.moshiDebug.detail.startsWith('live')", 20, "the conversation to go live")
        slot = next(s for s in srv.engine.slots if s is not None)
        assert (slot.settings.text_temperature, slot.settings.text_topk) == (0.35, 12)
        assert (slot.settings.audio_temperature, slot.settings.audio_topk) == (0.65, 99)
        wait_for(chromium, "window.moshiDebug.audio.secondsPlayed >= 2", 30, "2 s of played audio")
        d = _debug(chromium)
        assert d["lastError"] is None and d["received"]["audio"]["messages"] >= 10
        assert d["sent"]["audio"]["messages"] >= 10 and srv.engine.metrics.frames_in >= 10
        assert console_errors(chromium) == []
        chromium.find_element("id", "stop").click()
        wait_for(chromium, "window.moshiDebug.state === 'closed'", 10, "the conversation to stop")
