"""How many concurrent conversations hold real time on this machine?

Starts an openmoshi server in-process (loopback) with a model folder (default: a fresh tiny model), then for
N = 1, 2, 4, ... sessions streams real speech from N clients at real-time pace and reports the step latency
percentiles, the share of steps slower than 80 ms, dropped frames, and how late Moshi's audio arrived.

    python benchmarks/bench_server.py                    # tiny model, threads = all cores
    python benchmarks/bench_server.py --model bench-moshi --sessions 1 2 4

Kyutai's reference server cannot run here: it needs CUDA (it calls torch.cuda.synchronize() at start-up)
and serves one conversation at a time behind a lock.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from openmoshi.audio.io import load_audio
from openmoshi.bundle import init_model
from openmoshi.client import converse
from openmoshi.server.background import RunningServer

SPEECH = Path(__file__).resolve().parents[2] / "shared" / "data" / "speech"


def _speech(seconds: float) -> np.ndarray:
    files = sorted(SPEECH.glob("utt*.wav"))
    if files:
        pcm = np.concatenate([load_audio(f).wav[0].numpy() for f in files])
    else:  # no shared speech: a chirp keeps Mimi busy all the same
        t = np.arange(int(seconds * 24_000)) / 24_000
        pcm = 0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t).astype(np.float32)
    reps = int(np.ceil(seconds * 24_000 / len(pcm)))
    return np.tile(pcm, reps)[: int(seconds * 24_000)].astype(np.float32)


async def _round(url: str, n: int, pcm: np.ndarray):
    start = time.monotonic()
    convs = await asyncio.gather(*(converse(url, pcm, tail_s=0.5) for _ in range(n)))
    wall = time.monotonic() - start
    return convs, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: fresh tiny model)")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--seconds", type=float, default=8.0, help="audio per session")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model
    if model is None:
        model = init_model("tiny", Path(tempfile.mkdtemp()) / "tiny")
    pcm = _speech(args.seconds)
    print(f"model {model}, {torch.get_num_threads()} threads, {args.seconds:.0f} s of speech per session")
    print(f"{'sessions':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'late %':>7} {'dropped':>8} "
          f"{'wall/audio':>10} {'real time':>9}")
    for n in args.sessions:
        with RunningServer(model, max_sessions=n) as srv:
            convs, wall = asyncio.run(_round(srv.url, n, pcm))
            m = srv.engine.metrics
            pct = m.percentiles()
            late = 100 * m.steps_late / max(1, m.steps)
            dropped = m.frames_dropped
            received = min(len(c.pcm) for c in convs) / 24_000
            audio = args.seconds + 0.5
            ok = late < 5 and dropped == 0 and received > audio - 0.3
            print(f"{n:>8} {1000 * pct.get('0.5', 0):>8.1f} {1000 * pct.get('0.9', 0):>8.1f} "
                  f"{1000 * pct.get('0.99', 0):>8.1f} {late:>7.1f} {dropped:>8} {wall / audio:>10.2f} "
                  f"{'yes' if ok else 'NO':>9}")


if __name__ == "__main__":
    main()
