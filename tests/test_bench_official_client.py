"""benchmarks/bench_official_client.py reads the clients' own figures from their DOM: its parser on saved blocks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_official_client import parse_stats

# Kyutai's client (moshi/client, its ServerAudioStats), as a 2-page run left it (played set past a minute).
KYUTAI = (
    '<div class="player-stats hidden md:block"><div class="w-full border-2 border-white p-2 text-white ">'
    '<h2 class="text-md pb-2">Server Audio Stats</h2><table><tbody>'
    '<tr><td class="text-md pr-2">Audio played: </td><td>1:04.08</td></tr>'
    '<tr><td class="text-md pr-2">Missed audio: </td><td>0:03.66</td></tr>'
    '<tr><td class="text-md pr-2">Latency: </td><td>4.032</td></tr>'
    '<tr><td class="text-md pr-2">Min/Max buffer: </td><td>0.000 / 0.171</td></tr>'
    "</tbody></table></div></div>"
)

# Our page's stats list (openmoshi/server/static), shortened.
OURS = (
    '<dl id="stats" class="stats"><dt>State</dt><dd>connected — live: talk to Moshi</dd>'
    "<dt>Received audio</dt><dd>109 msgs, 35.3 KiB</dd>"
    "<dt>Audio played</dt><dd>7.8 s at 44100 Hz</dd>"
    "<dt>Playback buffer</dt><dd>133 ms, 7 underruns, 29606 samples dropped</dd>"
    "<dt>Missed audio</dt><dd>1.23 s</dd><dt>Latency</dt><dd>262 ms</dd>"
    '<dt>Server metadata</dt><dd>{"slot":0,"stream":{"state":"live"}}</dd></dl>'
)


def test_parse_kyutai_client_stats():
    assert parse_stats(KYUTAI) == pytest.approx(
        {"played": 64.08, "missed": 3.66, "latency": 4.032, "buffer_min": 0.0, "buffer_max": 0.171})


def test_parse_our_page_stats():
    assert parse_stats(OURS) == pytest.approx({"played": 7.8, "missed": 1.23, "latency": 0.262, "underruns": 7})


def test_parse_before_the_first_audio():
    """Kyutai's latency is a moving average over no readings yet (NaN) until its first refresh."""
    stats = parse_stats(KYUTAI.replace("4.032", "NaN").replace("1:04.08", "0:00.00"))
    assert stats["played"] == 0 and stats["latency"] != stats["latency"]


def test_parse_rejects_another_block():
    with pytest.raises(ValueError, match="Audio played"):
        parse_stats("<table><tr><td>Other:</td><td>1</td></tr></table>")
