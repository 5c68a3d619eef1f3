"""A conversation with a model through the web page: headless Chromium speaks questions into the page's
microphone and the page's own transcript is read back, with times.

    python recipes/talk_in_browser.py --model runs/tiny-talk/model          # 4 held-out questions
    python recipes/talk_in_browser.py --model M --questions 6 --out talk-page   # + screenshot, mic track, JSON

The questions are the `eval talk` held-out cases (held-out phrasings, voices nobody trained on, or a synth set's
test voices with --voices-from), each after 1 s of silence and followed by 4 s for the answer, played in a loop by
Chromium's fake microphone. The server is `openmoshi serve`'s app on this machine; the page is the bundled one.
Needs chromium + chromium-driver (Debian) and selenium. Prints the timeline: when the microphone carried speech
(which question, in order) and when each of Moshi's words appeared in the page.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the browser helpers the web-page tests use

POLL_S = 0.1
MIC_ON = 0.01  # the page's mic meter (RMS of the last 100 ms) above this: the user is speaking


def question_track(args: argparse.Namespace):
    from openmoshi.data.synth.talk import eval_questions
    from openmoshi.eval.talk import build_cases, held_out_voices
    cases = build_cases(eval_questions(args.questions, args.seed), held_out_voices(args.voices_from, seed=args.seed))
    return cases, np.concatenate([c.audio for c in cases])


def poll(driver, seconds: float) -> list[tuple[float, float, str]]:
    """(seconds since start, mic level, transcript) every POLL_S for `seconds`."""
    samples = []
    start = time.monotonic()
    while (now := time.monotonic() - start) < seconds:
        level, text = driver.execute_script(
            "const t = document.getElementById('transcript');"
            "return [window.moshiDebug.audio.micLevel || 0, t.querySelector('.placeholder') ? '' : t.textContent];")
        samples.append((now, float(level), text))
        time.sleep(POLL_S)
    return samples


def timeline(samples, cases) -> list[dict]:
    """Mic speech segments (labelled with the questions in loop order) and Moshi's new words, by time."""
    events, speaking, seg_start, asked = [], False, 0.0, 0
    for (t, level, _), nxt in zip(samples, samples[1:] + [None]):
        if level > MIC_ON and not speaking:
            speaking, seg_start = True, t
        quiet_after = nxt is None or all(s[1] <= MIC_ON for s in samples if t < s[0] <= t + 0.6)
        if speaking and level <= MIC_ON and quiet_after:
            speaking = False
            if t - seg_start >= 0.4:  # a question, not a click
                events.append({"t": round(seg_start, 2), "who": "user",
                               "text": cases[asked % len(cases)].question.text, "until": round(t, 2)})
                asked += 1
    previous = ""
    for t, _, text in samples:
        if len(text) > len(previous) and text.startswith(previous):
            new = text[len(previous):]
            if new.strip():
                events.append({"t": round(t, 2), "who": "moshi", "text": new})
        previous = text
    return sorted(events, key=lambda e: e["t"])


def turns(events: list[dict]) -> list[dict]:
    """Consecutive pieces of Moshi's text joined into one line per turn (the page's own spacing kept)."""
    out: list[dict] = []
    for e in events:
        if out and e["who"] == "moshi" == out[-1]["who"]:
            out[-1]["text"] += e["text"]
        else:
            out.append(dict(e))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder (e.g. what `openmoshi init --preset tiny-talk` "
                                                       "writes)")
    parser.add_argument("--questions", type=int, default=4, help="held-out questions to ask (default 4)")
    parser.add_argument("--seconds", type=float, default=0.0,
                        help="how long to converse (default: one pass over the questions, plus 2 s)")
    parser.add_argument("--voices-from", help="a synth set's folder: ask in its test voices")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="folder for the screenshot, the mic track and timeline.json")
    args = parser.parse_args(argv)
    if args.questions < 1:
        parser.error("--questions must be at least 1")

    from browser_utils import require_browser, start_chromium, wait_for, write_fake_mic

    from openmoshi.server.background import RunningServer

    out = args.out or Path(f"/tmp/talk-in-browser-{int(time.time())}")
    out.mkdir(parents=True, exist_ok=True)
    cases, track = question_track(args)
    sf.write(out / "questions24k.wav", track, 24_000)
    mic = write_fake_mic(out / "questions24k.wav", out / "mic48k.wav")
    seconds = args.seconds or len(track) / 24_000 + 2.0
    browser, driver_path = require_browser()
    with RunningServer(args.model, max_sessions=1) as srv:
        driver = start_chromium(mic, browser, driver_path)
        try:
            driver.get(srv.http + "/")
            wait_for(driver, "window.moshiDebug && document.body.dataset.state === 'idle'", 30, "the page")
            driver.find_element("id", "start").click()
            wait_for(driver, "window.moshiDebug.state === 'connected'", 30, "the conversation to start")
            samples = poll(driver, seconds)
            driver.save_screenshot(str(out / "page.png"))
            debug = driver.execute_script("return JSON.parse(JSON.stringify(window.moshiDebug));")
        finally:
            driver.quit()
    events = timeline(samples, cases)
    (out / "timeline.json").write_text(json.dumps({"events": events, "transcript": samples[-1][2] if samples else "",
                                                   "audio": debug.get("audio", {})}, indent=2) + "\n")
    for turn in turns(events):
        who = "User " if turn["who"] == "user" else "Moshi"
        print(f"{turn['t']:6.2f} s  {who}  {turn['text'].strip()}")
    print(f"\npage transcript: {samples[-1][2] if samples else ''!r}\nfiles: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
