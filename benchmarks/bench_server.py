"""How many concurrent conversations hold real time on this machine, beside Kyutai's reference server?

For N = 1, 2, 4, 8 clients, starts `openmoshi serve` (a separate process with its default settings,
`--max-sessions N`, as a user runs it) and streams real speech from N clients at once at real-time pace, with
real Opus both ways (`openmoshi.client.converse`, one process for all clients, as browsers would be). Per N:

- back %: Moshi's audio that came back, as a share of what a server that never drops returns (the input minus
  3 frames: the model's delay and codec buffers, what the client waits for); worst client and mean;
- gap s: the longest wait between two pieces of returned audio (a listener hears it as a dropout);
- latency p50/p95: from sending user frame k + d to receiving Moshi's frame k (d: the model's delay in frames,
  from the quickest first answer); after dropped input it also counts the audio missed;
- real time: every client >= 97% back and no gap over 0.5 s. The largest N held is printed last.

`--cpu-hog` runs a process that keeps one core busy meanwhile (a browser on the same machine takes ~0.9 core).

`--reference` also runs Kyutai's server (`moshi.server` from moshi==0.2.13) on the same weights, in a
subprocess patched to run on CPU: `torch.cuda.synchronize` (called by its warm-up) becomes a no-op, the LM
loads in float32 instead of bfloat16 (as ours runs), the tiny Mimi's config is passed to its loader, and it
gets the same torch thread count as ours. It serves one conversation at a time (an asyncio.Lock around the
whole session): the other clients get no handshake; they give up after `--handshake-timeout` and count as 0%.
With random weights whose text vocabulary (`text_card`) is larger than the tokenizer (the bench preset: the tiny
tokenizer), it ends the session at the first sampled text token past the tokenizer (IndexError in
`id_to_piece`); ours sends no text for such tokens. The tiny preset's tokenizer covers its vocabulary.

    python benchmarks/bench_server.py                        # tiny model, N = 1 2 4 8, 10 s per client
    python benchmarks/bench_server.py --cpu-hog --reference
    python benchmarks/bench_server.py --model bench-moshi --sessions 1 2 4
    python benchmarks/bench_server.py --precisions fp32 int8 int4     # our server per LM precision
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np

from openmoshi.audio.io import load_audio
from openmoshi.bundle import init_model
from openmoshi.cli.common import default_threads, usable_cores
from openmoshi.client import CHUNK, SAMPLE_RATE, converse
from openmoshi.errors import OpenMoshiError

REPO = Path(__file__).resolve().parents[1]
SPEECH = REPO.parents[1] / "shared" / "data" / "speech"
TAIL_S = 0.5
FULL_SHORTFALL = 3  # frames: a server that drops nothing returns all but the last few (model delay, codec buffers)
REAL_TIME_BACK = 97.0  # % of the audio back ...
REAL_TIME_GAP_S = 0.5  # ... and no longer wait between two pieces of it

# Runs Kyutai's server on CPU: patches in this subprocess only, then its own main (run at import).
REFERENCE_BOOT = r"""
import json, sys
from pathlib import Path
import torch
folder, port, threads = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
static = sys.argv[4] if len(sys.argv) > 4 else "none"  # a web page folder to serve at /, or none
torch.set_num_threads(threads)
torch.cuda.synchronize = lambda *args, **kwargs: None  # its warm-up syncs CUDA unconditionally
from moshi.models import loaders
get_moshi = loaders.CheckpointInfo.get_moshi
loaders.CheckpointInfo.get_moshi = lambda self, device="cpu", dtype=None, **kw: get_moshi(
    self, device=device, dtype=torch.float32, **kw)  # bfloat16 by default; ours runs float32 on CPU
config = json.loads((folder / "config.json").read_text())
if config.get("mimi_config_name"):  # a Mimi of another shape (tiny): its config, else the official one
    from_hf_repo = loaders.CheckpointInfo.from_hf_repo
    loaders.CheckpointInfo.from_hf_repo = staticmethod(lambda repo, *args, **kw: from_hf_repo(
        repo, *args, mimi_config_path=folder / config["mimi_config_name"], **kw))
sys.argv = ["moshi.server", "--host", "127.0.0.1", "--port", port, "--device", "cpu", "--static", static,
            "--config-path", str(folder / "config.json"), "--moshi-weight", str(folder / config["moshi_name"]),
            "--mimi-weight", str(folder / config["mimi_name"]), "--tokenizer", str(folder / config["tokenizer_name"])]
import moshi.server  # noqa: E402,F401  (runs the server)
"""


def _speech(seconds: float) -> np.ndarray:
    files = sorted(SPEECH.glob("utt*.wav"))
    if files:
        pcm = np.concatenate([load_audio(f).wav[0].numpy() for f in files])
    else:  # no shared speech: a chirp keeps Mimi busy all the same
        t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
        pcm = 0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t).astype(np.float32)
    reps = int(np.ceil(seconds * SAMPLE_RATE / len(pcm)))
    return np.tile(pcm, reps)[: int(seconds * SAMPLE_RATE)].astype(np.float32)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _process(cmd: list[str], log: Path):
    with open(log, "w") as out:
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_until(ready, proc: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            if ready():
                return
        time.sleep(0.2)
    raise RuntimeError(f"the server was not ready in {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def ours(model: Path, sessions: int | None, threads: int, logs: Path, extra: tuple[str, ...] = (),
         quantize: str = "fp32"):
    """`openmoshi serve` as a user starts it (`sessions`, `threads`: None / 0 = its defaults; `extra` options;
    `quantize`: fp32 / int8 / int4 weights); yields (chat URL, its pid) once /health says ok (warmed up)."""
    log = logs / f"ours-{quantize}-{sessions or 'default'}.log"
    cmd = [sys.executable, "-m", "openmoshi", "serve", "--model", str(model), "--device", "cpu", "--port", "0",
           *(["--max-sessions", str(sessions)] if sessions else []), *(["--threads", str(threads)] if threads else []),
           *(["--quantize", quantize] if quantize != "fp32" else []), *extra]
    with _process(cmd, log) as proc:
        port: list[int] = []

        def healthy() -> bool:
            if not port:
                match = re.search(r"on http://127\.0\.0\.1:(\d+)/", log.read_text())
                if not match:
                    return False
                port.append(int(match.group(1)))
            with urllib.request.urlopen(f"http://127.0.0.1:{port[0]}/health", timeout=5) as r:
                return json.loads(r.read())["status"] == "ok"

        _wait_until(healthy, proc, log)
        yield f"ws://127.0.0.1:{port[0]}/api/chat", proc.pid


@contextlib.contextmanager
def reference(model: Path, threads: int, logs: Path, static: Path | None = None):
    """Kyutai's `moshi.server` on CPU (see REFERENCE_BOOT), serving the web page folder `static` if given; ready
    once its port accepts (after its warm-up)."""
    log, port = logs / "reference.log", _free_port()
    cmd = [sys.executable, "-c", REFERENCE_BOOT, str(model), str(port), str(threads), str(static or "none")]
    with _process(cmd, log) as proc:
        _wait_until(lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() or True, proc, log)
        yield f"ws://127.0.0.1:{port}/api/chat"


@dataclass
class ClientRun:
    sent: list[float] = field(default_factory=list)  # send time of each 80 ms user frame
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (time, samples) of returned audio
    error: str = ""

    @property
    def received(self) -> int:
        return sum(n for _, n in self.arrivals)


async def _client(url: str, pcm: np.ndarray, handshake_timeout_s: float) -> ClientRun:
    run = ClientRun()
    try:
        await converse(url, pcm, tail_s=TAIL_S, timeout_s=handshake_timeout_s,
                       on_send=lambda chunk: run.sent.append(time.monotonic()),
                       on_audio=lambda out: run.arrivals.append((time.monotonic(), len(out))))
    except (OpenMoshiError, aiohttp.ClientError, ConnectionError) as exc:  # refused, or the server hung up
        run.error = f"{type(exc).__name__}: {exc}"
    return run


async def _round(url: str, n: int, pcm: np.ndarray, handshake_timeout_s: float) -> list[ClientRun]:
    return list(await asyncio.gather(*(_client(url, pcm, handshake_timeout_s) for _ in range(n))))


def _frames_sent(pcm: np.ndarray) -> int:
    return -(-(len(pcm) + int(TAIL_S * SAMPLE_RATE)) // CHUNK)


def model_delay(runs: list[ClientRun]) -> int:
    """Frames sent before the first answer arrived, minus one, in the quickest conversation: the model's delay."""
    counts = [sum(t < r.arrivals[0][0] for t in r.sent) - 1 for r in runs if r.arrivals]
    return max(0, min(counts, default=0))


def summarize(runs: list[ClientRun], delay: int, sent_frames: int) -> dict:
    """back % (worst, mean), longest gap, latency p50/p95 of one round (see the module docstring)."""
    full = (sent_frames - FULL_SHORTFALL) * CHUNK
    back = [100 * min(1.0, r.received / full) for r in runs]
    gaps, latencies = [0.0], []
    for r in runs:
        times = [t for t, _ in r.arrivals]
        gaps += list(np.diff(times)) if len(times) > 1 else []
        total = 0
        for t, samples in r.arrivals:
            total += samples
            k = total // CHUNK - 1  # Moshi's last whole frame in hand
            if 0 <= k and k + delay < len(r.sent):
                latencies.append(t - r.sent[k + delay])
    p50, p95 = np.percentile(latencies, [50, 95]) if latencies else (float("nan"), float("nan"))
    held = min(back) >= REAL_TIME_BACK and max(gaps) <= REAL_TIME_GAP_S
    return {"back_min": min(back), "back_mean": float(np.mean(back)), "gap": max(gaps), "p50": p50, "p95": p95,
            "held": held, "failed": sum(bool(r.error) for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: a fresh tiny model)")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 8], help="the N to try")
    parser.add_argument("--seconds", type=float, default=10.0, help="speech per client")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads of the servers (0: what `openmoshi serve` picks by default)")
    parser.add_argument("--cpu-hog", action="store_true", help="keep one core busy meanwhile (a browser)")
    parser.add_argument("--reference", action="store_true", help="also run Kyutai's moshi.server on CPU")
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "int8", "int4"],
                        help="run our server once per LM precision (serve --quantize int8|int4)")
    parser.add_argument("--handshake-timeout", type=float, default=3.0,
                        help="a client without a handshake after this many seconds gives up (counts as 0%%)")
    parser.add_argument("--logs", type=Path, default=None, help="server logs here (default: a temp folder)")
    args = parser.parse_args()

    logs = args.logs or Path(tempfile.mkdtemp(prefix="bench_server_"))
    logs.mkdir(parents=True, exist_ok=True)
    model = args.model or init_model("tiny", logs / "tiny", seed=0)
    threads = args.threads or default_threads(usable_cores(), "serve")
    pcm = _speech(args.seconds)
    sent_frames = _frames_sent(pcm)
    print(f"model {model}, {usable_cores()} usable cores, server torch threads {threads}"
          f"{' (serve default)' if not args.threads else ''}, {args.seconds:g} s of speech per client"
          f"{', one core kept busy by another process' if args.cpu_hog else ''}; logs in {logs}", flush=True)

    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.cpu_hog else None
    names = {p: "openmoshi" if p == "fp32" and len(args.precisions) == 1 else f"ours {p}" for p in args.precisions}
    raw: dict[str, dict[int, list[ClientRun]]] = {**{name: {} for name in names.values()}, "reference": {}}
    try:
        for precision, name in names.items():
            for n in args.sessions:
                with ours(model, n, args.threads, logs, quantize=precision) as (url, _):
                    raw[name][n] = asyncio.run(_round(url, n, pcm, 30.0))
                print(f"  {name} N={n} done", flush=True)
        if args.reference:
            with reference(model, threads, logs) as url:
                for n in args.sessions:
                    raw["reference"][n] = asyncio.run(_round(url, n, pcm, args.handshake_timeout))
                    time.sleep(1.0)  # the clients that gave up leave the lock's queue
                    print(f"  reference N={n} done", flush=True)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()

    for server, rounds in raw.items():  # what went wrong, once per kind
        for message in sorted({r.error for runs in rounds.values() for r in runs if r.error}):
            print(f"{server}: a client ended with {message[:200]}")
    print(f"\n{'server':>10} {'N':>3} {'back % min':>10} {'mean':>6} {'gap s':>6} {'lat p50':>8} {'p95':>6} "
          f"{'failed':>7} {'real time':>9}")
    for server, rounds in raw.items():
        if not rounds:
            continue
        delay = model_delay([r for runs in rounds.values() for r in runs])
        best = 0
        for n, runs in rounds.items():
            s = summarize(runs, delay, sent_frames)
            best = n if s["held"] and n > best else best
            print(f"{server:>10} {n:>3} {s['back_min']:>10.1f} {s['back_mean']:>6.1f} {s['gap']:>6.2f} "
                  f"{s['p50']:>8.2f} {s['p95']:>6.2f} {s['failed']:>7} {'yes' if s['held'] else 'NO':>9}")
        print(f"{server:>10}: largest N held at real time: {best or 'none'} (model delay {delay} frames)")


if __name__ == "__main__":
    main()
