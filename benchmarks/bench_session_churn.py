"""Does memory stay flat over many conversations? M short sessions in a row against one server.

Starts a RunningServer in this process (a fresh tiny model by default), then runs M conversations one after
the other through the real client (`converse`: Opus both ways, `--audio-s` of speech each, sent as fast as the
server's input budget allows), and every `--every` sessions samples this process's RSS (after a gc) and counts
the live per-session objects (sessions, slots, Opus streams, asyncio tasks). Prints the RSS curve and the growth
per 100 sessions (least-squares slope after the first sample, which still includes one-time allocations).

    python benchmarks/bench_session_churn.py --sessions 1000
    python benchmarks/bench_session_churn.py --sessions 300 --tracemalloc   # where does memory grow?
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import _speech, ours

from openmoshi.audio.opus import OpusDecoderStream, OpusEncoderStream
from openmoshi.bundle import init_model
from openmoshi.client import converse
from openmoshi.server.background import RunningServer
from openmoshi.server.engine import Slot
from openmoshi.server.session import ChatSession


def rss_mb(pid: int | str = "self") -> float:
    """Resident memory of a process (VmRSS), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def live_objects(server: RunningServer) -> dict[str, int]:
    """Per-session objects still alive: each should be 0 (or a constant) between sessions."""
    counts = dict.fromkeys(("ChatSession", "Slot", "OpusDecoderStream", "OpusEncoderStream"), 0)
    for obj in gc.get_objects():
        for kind in (ChatSession, Slot, OpusDecoderStream, OpusEncoderStream):
            if type(obj) is kind:
                counts[kind.__name__] += 1
    # The server's loop runs in its own thread: its tasks are counted there.
    counts["server tasks"] = asyncio.run_coroutine_threadsafe(_count_tasks(), server.loop).result(10)
    return counts


async def _count_tasks() -> int:
    return len(asyncio.all_tasks())


def growth_per_100(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of RSS (MB) per 100 sessions, leaving out the first sample."""
    if len(points) < 3:
        return float("nan")
    x, y = np.array(points[1:], dtype=float).T
    return float(np.polyfit(x, y, 1)[0] * 100)


async def churn(url: str, pcm: np.ndarray, count: int, parallel: int = 1, realtime: bool = False) -> None:
    """`count` conversations, `parallel` at a time."""
    async def one_after_another(n: int) -> None:
        for _ in range(n):
            conv = await converse(url, pcm, realtime=realtime, tail_s=0.2, timeout_s=20)
            if conv.errors or not conv.audio:
                raise RuntimeError(f"a session failed: {conv.errors or 'no audio back'}")

    shares = [count // parallel + (i < count % parallel) for i in range(parallel)]
    await asyncio.gather(*(one_after_another(n) for n in shares if n))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: a fresh tiny model)")
    parser.add_argument("--sessions", type=int, default=1000, help="conversations in a row")
    parser.add_argument("--every", type=int, default=50, help="sample RSS after this many sessions")
    parser.add_argument("--audio-s", type=float, default=0.5, help="speech per session")
    parser.add_argument("--parallel", type=int, default=1, help="conversations at a time")
    parser.add_argument("--realtime", action="store_true", help="send at real-time pace (default: faster)")
    parser.add_argument("--serve", action="store_true",
                        help="the server in its own process (`openmoshi serve`, default settings); RSS is its own")
    parser.add_argument("--tracemalloc", action="store_true", help="print the Python allocations that grew most")
    args = parser.parse_args()

    model = args.model or init_model("tiny", Path(tempfile.mkdtemp()) / "tiny", seed=0)
    pcm = _speech(args.audio_s)
    points: list[tuple[int, float]] = []
    slots = args.parallel + 1  # a client may be back before the server has released its last slot
    with contextlib.ExitStack() as stack:
        if args.serve:
            url, pid = stack.enter_context(ours(model, slots, 0, Path(tempfile.mkdtemp(prefix="churn_"))))
            server = None
        else:
            server = stack.enter_context(RunningServer(model, max_sessions=slots))
            url, pid = server.url, "self"
        asyncio.run(churn(url, pcm, 2 * args.parallel, args.parallel))  # one-time allocations (codecs, caches)
        gc.collect()
        if args.tracemalloc:
            tracemalloc.start(25)
            before = tracemalloc.take_snapshot()
        start = time.monotonic()
        print(f"{'sessions':>8} {'RSS MB':>8} {'+MB':>6} {'s/session':>9}  live objects", flush=True)
        done = 0
        while True:
            time.sleep(0.5)  # the server ends a session just after its client has left
            gc.collect()
            points.append((done, rss_mb(pid)))
            rate = (time.monotonic() - start - 0.5 * len(points)) / max(1, done)
            print(f"{done:>8} {points[-1][1]:>8.1f} {points[-1][1] - points[0][1]:>6.1f} {rate:>9.3f}  "
                  f"{live_objects(server) if server else '(in the server process)'}", flush=True)
            if done >= args.sessions:
                break
            step = min(args.every, args.sessions - done)
            asyncio.run(churn(url, pcm, step, args.parallel, args.realtime))
            done += step
        if args.tracemalloc:
            after = tracemalloc.take_snapshot()
            print("\nPython allocations that grew most (this process):")
            for stat in after.compare_to(before, "traceback")[:8]:
                print(f"  {stat.size_diff / 1024:+.0f} KiB in {stat.count_diff:+d} blocks at")
                for line in stat.traceback.format()[-6:]:
                    print("   ", line)
    where = "`openmoshi serve` process" if args.serve else "process (server and clients)"
    print(f"\n{args.sessions} sessions of {args.audio_s:g} s, {args.parallel} at a time: RSS of the {where} "
          f"{points[0][1]:.1f} -> {points[-1][1]:.1f} MB, growth {growth_per_100(points):+.2f} MB per 100 "
          "sessions (slope after the first sample)")


if __name__ == "__main__":
    main()
