"""Kyutai's own web client (the React app in `client/` of github.com/kyutai-labs/moshi) against our server.

The setup of a new user on a small machine: `openmoshi serve --static DIST` (default settings unless a
configuration says otherwise) on a fresh tiny random model, and N pages of Kyutai's client in headless
Chromium on the same machine (one browser, one window per page), each with a fake microphone playing real
speech (../shared/data/speech). Each page clicks Connect, converses for --seconds once all pages are connected
(or --connect-timeout passed), then the client's own "Server Audio Stats" are read from its DOM:

- played: audio its player played (`Audio played`);
- missed: time its player ran dry after the first audio (`Missed audio`);
- latency: its `Latency`, microphone seconds encoded minus the playback position (a moving average, read
  every 2 s once audio plays: median and max of the readings);
- buffer: its `Min/Max buffer` (seconds queued in its player).

Beside them, over the conversation: CPU (% of one core, from /proc) of the server, of the browser and of the
rest of the machine (this script and whatever else runs: compare runs only when it is low), and for our
server the model steps, late steps (> 80 ms) and dropped user frames (from /metrics).

Configurations (--configs, each a separate server):
  default      `openmoshi serve --model M --static DIST`, nothing else
  threads=K    the same with `--threads K` (on 2 cores the default is 1; the old default used all cores)
  reference    Kyutai's `moshi.server` 0.2.13 on CPU serving the same client (see bench_server.py; one
               conversation at a time: a second page waits for a slot)
  ours-page    our own bundled page instead of Kyutai's client (default settings); its Missed audio is what
               the server dropped plus what the player discarded, its latency the server's plus the player's
               buffer, and underruns are counted (not timed), so compare it only loosely

Build Kyutai's client first (Node 18+), outside this repo:
    git clone https://github.com/kyutai-labs/moshi && cd moshi/client && npm install && npm run build

    python benchmarks/bench_official_client.py --client-dist moshi/client/dist
    python benchmarks/bench_official_client.py --client-dist DIST --configs threads=2 reference --pages 1 2
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import soundfile as sf

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "tests"))
from bench_server import SAMPLE_RATE, _speech, ours, reference

from openmoshi.bundle import init_model
from openmoshi.cli.common import default_threads, usable_cores

FRAME_S = 0.08
SAMPLE_EVERY_S = 2.0

# One script, run atomically in a page: the rows of Kyutai's stats table, whether the page holds a handshake
# (its green dot), and whether it waits for a slot.
KYUTAI_STATE_JS = """
const stats = document.querySelector('.player-stats');
return {html: stats ? stats.outerHTML : '', connected: !!document.querySelector('.bg-green-700'),
        waiting: document.body.textContent.includes('Waiting for a slot')};
"""
OURS_STATE_JS = """
const d = window.moshiDebug;
return {html: document.getElementById('stats').outerHTML, connected: !!d && d.state === 'connected',
        waiting: false};
"""


def _seconds(text: str) -> float:
    """'1:02.35' (Kyutai's m:ss.cc), '19.3 s', '310 ms' or '0.312' as seconds."""
    text = text.strip()
    if match := re.fullmatch(r"(\d+):(\d+(?:\.\d+)?)", text):
        return 60 * int(match.group(1)) + float(match.group(2))
    if match := re.match(r"(-?\d+(?:\.\d+)?)\s*(ms|s)?\b", text):
        value = float(match.group(1))
        return value / 1000 if match.group(2) == "ms" else value
    raise ValueError(f"not a duration: {text!r}")


def _cells(html: str) -> list[str]:
    """The text of each <td>/<dt>/<dd> of a table or definition list, in order."""
    cells = re.findall(r"<(td|dt|dd)\b[^>]*>(.*?)</\1>", html, flags=re.DOTALL)
    return [re.sub(r"\s+", " ", re.sub(r"<[^>]+>|<!--.*?-->", "", body)).strip() for _, body in cells]


def parse_stats(html: str) -> dict[str, float]:
    """played, missed, latency (s) and, where shown, buffer_min/buffer_max (s) or underruns, from the stats
    block of Kyutai's client (its `.player-stats` table) or of our page (its `#stats` list)."""
    cells = _cells(html)
    rows = {cells[i].rstrip(": ").lower(): cells[i + 1] for i in range(0, len(cells) - 1, 2)}
    if "audio played" not in rows:
        raise ValueError("no 'Audio played' row in the stats block")
    out = {"played": _seconds(rows["audio played"]), "missed": _seconds(rows["missed audio"]),
           "latency": _seconds(rows["latency"]) if rows.get("latency", "NaN") != "NaN" else float("nan")}
    if "min/max buffer" in rows:
        low, high = rows["min/max buffer"].split("/")
        out["buffer_min"], out["buffer_max"] = _seconds(low), _seconds(high)
    if match := re.search(r"(\d+) underruns", rows.get("playback buffer", "")):
        out["underruns"] = float(match.group(1))
    return out


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far (those that exited count 0)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / 100.0  # clock ticks: USER_HZ is 100 on Linux


def _machine_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine so far, all cores (/proc/stat: all but idle and iowait)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / 100.0


def _descendants(root: int) -> list[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def _metrics(http: str) -> dict[str, float]:
    """Our server's counters from /metrics (empty for a server without them)."""
    try:
        with urllib.request.urlopen(f"{http}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    counters = re.finditer(r"^openmoshi_(\w+_total) (\S+)$", text, re.MULTILINE)
    return {m.group(1): float(m.group(2)) for m in counters}


@dataclass
class PageRun:
    start: dict[str, float] = field(default_factory=dict)  # the figures as the conversation window opened
    final: dict[str, float] = field(default_factory=dict)  # ... and as it closed
    html: str = ""  # the stats block of the last reading
    latencies: list[float] = field(default_factory=list)
    connected: bool = False
    waiting: bool = False  # the page said it waits for a slot (Kyutai's client, connected but no handshake)
    error: str = ""


@dataclass
class Run:
    config: str
    pages: list[PageRun]
    seconds: float  # the conversation window
    cpu: dict[str, float]  # server, browser, other (the rest of the machine): % of one core over the window
    counters: dict[str, float]


def _converse(driver, url: str, n: int, ours_page: bool, seconds: float, connect_timeout: float,
              server_pids: list[int], http: str | None) -> tuple[list[PageRun], float, dict, dict]:
    """Opens n windows of the page, connects each, holds the conversation, reads the figures."""
    from selenium.webdriver.common.by import By

    handles = []
    for i in range(n):
        if i:
            driver.switch_to.new_window("window")
        driver.get(url)
        handles.append(driver.current_window_handle)
    for handle in handles:  # each page's Connect (ours: Start), as a user clicks it
        driver.switch_to.window(handle)
        deadline = time.monotonic() + 20
        while True:
            buttons = (driver.find_elements(By.ID, "start") if ours_page else
                       driver.find_elements(By.XPATH, "//button[normalize-space()='Connect']"))
            if buttons and buttons[0].is_enabled():
                buttons[0].click()
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the page shows no Connect button")
            time.sleep(0.2)
    script = OURS_STATE_JS if ours_page else KYUTAI_STATE_JS
    pages = [PageRun() for _ in handles]

    def poll(record: bool) -> None:
        for handle, page in zip(handles, pages):
            driver.switch_to.window(handle)
            state = driver.execute_script(script)
            page.connected = page.connected or state["connected"]
            page.waiting = state["waiting"]
            if not state["html"]:
                continue
            try:
                figures = parse_stats(state["html"])
            except ValueError as exc:
                page.error = str(exc)
                continue
            page.final, page.html, page.error = figures, state["html"], ""
            if record and figures["played"] > 0 and not math.isnan(figures["latency"]):
                page.latencies.append(figures["latency"])

    deadline = time.monotonic() + connect_timeout
    while time.monotonic() < deadline and not all(p.connected for p in pages):
        poll(False)
        time.sleep(0.25)
    if ours_page:  # our stats list is filled while its panel is open
        for handle in handles:
            driver.switch_to.window(handle)
            driver.find_element(By.CSS_SELECTOR, "#stats-panel summary").click()

    poll(False)
    for page in pages:
        page.start = dict(page.final)
    browser_pids = _descendants(driver.service.process.pid)
    before = _metrics(http) if http else {}
    cpu0 = [_cpu_seconds(server_pids), _cpu_seconds(browser_pids), _machine_cpu_seconds()]
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        time.sleep(min(SAMPLE_EVERY_S, max(0.0, seconds - (time.monotonic() - t0))))
        poll(True)
    elapsed = time.monotonic() - t0
    server, browser, machine = (100 * (now - then) / elapsed for now, then in zip(
        [_cpu_seconds(server_pids), _cpu_seconds(browser_pids), _machine_cpu_seconds()], cpu0))
    cpu = {"server": server, "browser": browser, "other": max(0.0, machine - server - browser)}
    after = _metrics(http) if http else {}
    counters = {k: after[k] - before.get(k, 0) for k in after}
    return pages, elapsed, cpu, counters


def run_config(config: str, n: int, args, model: Path, mic: Path, logs: Path) -> Run:
    from browser_utils import CHROMIUM_CANDIDATES, DRIVER_CANDIDATES, _first_existing, start_chromium

    browser = _first_existing(CHROMIUM_CANDIDATES, "chromium")
    driver_path = _first_existing(DRIVER_CANDIDATES, "chromedriver")
    if browser is None or driver_path is None:
        sys.exit("needs chromium and chromedriver (apt-get install chromium chromium-driver)")
    with contextlib.ExitStack() as stack:
        if config == "reference":
            threads = default_threads(usable_cores(), "serve")
            ws = stack.enter_context(reference(model, threads, logs, static=args.client_dist))
            server_pids = [p for p in _descendants(os.getpid())[1:] if "moshi.server" in _cmdline(p)]
        else:
            threads = int(config.split("=", 1)[1]) if config.startswith("threads=") else 0
            static = () if config == "ours-page" else ("--static", str(args.client_dist))
            ws, pid = stack.enter_context(ours(model, None, threads, logs, extra=static))
            server_pids = [pid]
        http = ws.replace("ws://", "http://").removesuffix("/api/chat")
        driver = start_chromium(mic, browser, driver_path)
        stack.callback(driver.quit)
        pages, elapsed, cpu, counters = _converse(
            driver, http + "/", n, config == "ours-page", args.seconds, args.connect_timeout, server_pids,
            None if config == "reference" else http)
    return Run(config, pages, elapsed, cpu, counters)


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    return ""


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


def _missed_pct(figures: dict[str, float]) -> float | None:
    total = figures.get("played", 0) + figures.get("missed", 0)
    return 100 * figures["missed"] / total if total else None


COLUMNS = ("config", "page", "conn", "played s", "missed s", "missed %", "lat med", "lat max", "buf max",
           "srv cpu%", "brw cpu%", "oth cpu%", "steps", "late", "dropped")


def page_row(run: Run, i: int) -> list[str]:
    """One table row: page i's figures over the window; the server's (CPU, counters) on the first page's row."""
    page = run.pages[i]
    f = dict(page.final)
    for key in ("played", "missed"):  # the client's counters are cumulative: their growth in the window
        if key in f:
            f[key] -= page.start.get(key, 0.0)
    lat = page.latencies
    server = [run.cpu[k] for k in ("server", "browser", "other")]
    server += [run.counters.get(k) for k in ("steps_total", "steps_late_total", "frames_dropped_total")]
    if i:
        server = [None] * len(server)
    return [run.config, f"{i + 1}/{len(run.pages)}", "yes" if page.connected else "NO",
            _fmt(f.get("played")), _fmt(f.get("missed")), _fmt(_missed_pct(f), ".1f"),
            _fmt(statistics.median(lat) if lat else None, ".3f"), _fmt(max(lat) if lat else None, ".3f"),
            _fmt(f.get("buffer_max"), ".3f")] + [_fmt(v, ".0f") for v in server]


def print_table(runs: list[Run]) -> None:
    widths = [max(10, len(c)) if j == 0 else max(5, len(c)) for j, c in enumerate(COLUMNS)]
    print("\n" + " ".join(c.rjust(w) for c, w in zip(COLUMNS, widths)))
    for run in runs:
        for i, page in enumerate(run.pages):
            notes = [page.error] if page.error else []
            if page.waiting:
                notes.append("waiting for a slot")
            if "underruns" in page.final:
                notes.append(f"underruns {page.final['underruns']:.0f}")
            print(" ".join(c.rjust(w) for c, w in zip(page_row(run, i), widths)) + "  " + ", ".join(notes))
        print(f"{'':>10} conversation window {run.seconds:.1f} s ({run.seconds / FRAME_S:.0f} steps at real time)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--client-dist", type=Path, required=True,
                        help="Kyutai's built web client (the dist folder of `npm run build` in moshi/client)")
    parser.add_argument("--configs", nargs="+", default=["default", "threads=1"],
                        help="server configurations, in order: default, threads=K, reference, ours-page "
                             "(default: default threads=1)")
    parser.add_argument("--pages", type=int, nargs="+", default=[1, 2], help="pages open at once (default 1 2)")
    parser.add_argument("--seconds", type=float, default=20.0, help="conversation length (default 20)")
    parser.add_argument("--connect-timeout", type=float, default=10.0,
                        help="seconds to wait for every page's handshake before the conversation is timed "
                             "anyway (a page still waiting counts as not connected)")
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: a fresh tiny model)")
    parser.add_argument("--logs", type=Path, default=None, help="server logs here (default: a temp folder)")
    args = parser.parse_args()
    if not (args.client_dist / "index.html").is_file():
        parser.error(f"--client-dist {args.client_dist}: no index.html (build the client: npm run build)")
    args.client_dist = args.client_dist.resolve()
    for config in args.configs:
        if config not in ("default", "reference", "ours-page") and not re.fullmatch(r"threads=[1-9]\d*", config):
            parser.error(f"unknown configuration {config!r} (default, threads=K, reference, ours-page)")
    if min(args.pages) < 1 or args.seconds <= 0:
        parser.error("--pages must be >= 1 and --seconds > 0")

    logs = args.logs or Path(tempfile.mkdtemp(prefix="bench_official_client_"))
    logs.mkdir(parents=True, exist_ok=True)
    model = args.model or init_model("tiny", logs / "tiny", seed=0)
    speech = logs / "speech24k.wav"
    sf.write(speech, _speech(30.0), SAMPLE_RATE, subtype="PCM_16")  # the fake mic loops it
    from browser_utils import write_fake_mic

    mic = write_fake_mic(speech, logs / "speech48k.wav")
    print(f"model {model}, {usable_cores()} usable cores (serve default: "
          f"{default_threads(usable_cores(), 'serve')} torch thread(s)), {args.seconds:g} s conversations, "
          f"client {args.client_dist}; logs in {logs}", flush=True)
    runs = []
    for config in args.configs:
        for n in args.pages:
            runs.append(run_config(config, n, args, model, mic, logs))
            for i, page in enumerate(runs[-1].pages):  # what the figures were read from
                (logs / f"stats-{config}-{n}-{i + 1}.html").write_text(page.html)
            print(f"  {config} with {n} page(s) done", flush=True)
    print_table(runs)


if __name__ == "__main__":
    main()
