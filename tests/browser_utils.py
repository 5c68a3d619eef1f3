"""Drive headless Chromium (Debian's chromium + chromium-driver) with Selenium for the web page tests."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
DRIVER_CANDIDATES = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
FAKE_MIC_RATE = 48_000  # Chromium's fake capture device runs at 48 kHz; a matching file needs no resampling


def _first_existing(names: tuple[str, ...], which: str) -> str | None:
    for name in names:
        if os.path.exists(name):
            return name
    return shutil.which(which)


def require_browser() -> tuple[str, str]:
    """(chromium, chromedriver) paths; skips the test when either or Selenium is missing."""
    pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")
    browser = _first_existing(CHROMIUM_CANDIDATES, "chromium")
    driver = _first_existing(DRIVER_CANDIDATES, "chromedriver")
    if browser is None or driver is None:
        pytest.skip("chromium and chromium-driver are not installed "
                    "(apt-get install chromium chromium-driver)")
    return browser, driver


def write_fake_mic(source: Path, dest: Path, seconds: float | None = None) -> Path:
    """Chromium's fake microphone wants 16-bit PCM wav: `source` as mono 48 kHz PCM_16 at `dest`."""
    from openmoshi.audio.io import resample

    data, sr = sf.read(source, dtype="float32", always_2d=True)
    mono = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1)))[None]
    if sr != FAKE_MIC_RATE:
        mono = resample(mono, sr, FAKE_MIC_RATE)
    pcm = mono[0].numpy()
    if seconds is not None:
        pcm = pcm[: int(seconds * FAKE_MIC_RATE)]
    sf.write(dest, np.clip(pcm, -1.0, 1.0), FAKE_MIC_RATE, subtype="PCM_16")
    return dest


def start_chromium(fake_mic: Path, browser: str, driver: str, width: int = 1000, height: int = 1100):
    """A headless Chromium whose microphone plays `fake_mic` (in a loop), with autoplay allowed."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={fake_mic}",
        "--autoplay-policy=no-user-gesture-required",
        f"--window-size={width},{height}",
        "--no-first-run",
        "--mute-audio",  # the output still runs (and is counted by the page); nothing reaches a sound card
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=driver)  # an explicit driver: Selenium Manager never downloads one
    return webdriver.Chrome(service=service, options=options)


def wait_for(driver, script: str, timeout: float, what: str, interval: float = 0.1):
    """Polls `return <script>` in the page until it is truthy; returns the value, else fails with the page."""
    deadline = time.monotonic() + timeout
    while True:
        value = driver.execute_script(f"return {script};")
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} ({script}); "
                        f"page: {page_summary(driver)}")
        time.sleep(interval)


def page_summary(driver) -> str:
    """The page's state, detail and error, and its console errors, for failure messages."""
    info = driver.execute_script(
        "const d = window.moshiDebug; return d ? {state: d.state, detail: d.detail, lastError: d.lastError,"
        " received: d.received, audio: d.audio} : {body: document.body.dataset.state};"
    )
    return f"{info} console errors: {console_errors(driver)[-10:]}"


def console_errors(driver) -> list[str]:
    """The page's console errors since the last call (Chromium hands each log entry out once)."""
    from selenium.common.exceptions import WebDriverException

    try:
        return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    except (AttributeError, WebDriverException):  # a driver without log support
        return []


def save_screenshot(driver, tmp_path: Path, name: str) -> Path:
    """Saves a PNG into tmp_path, and also into $OPENMOSHI_ARTIFACTS when set."""
    path = tmp_path / f"{name}.png"
    driver.save_screenshot(str(path))
    artifacts = os.environ.get("OPENMOSHI_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(artifacts) / path.name)
    return path
