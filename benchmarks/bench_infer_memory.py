"""Peak memory of `openmoshi infer` against the length of the input: streaming keeps it flat.

    PYTHONPATH=. python benchmarks/bench_infer_memory.py --minutes 0.25 1 60

Writes a noise recording of each length (24 kHz wav), runs `python -m openmoshi infer` on it with a tiny model
in a subprocess and prints the subprocess's peak RSS (ru_maxrss) and its run time. `--repo` points at another
checkout to compare (e.g. one whose infer loads whole files).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf


def peak_rss_mb(cmd: list[str], env: dict) -> tuple[float, float]:
    """Peak RSS (MB) and wall time of one command, measured with wait4's rusage."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, nargs="+", default=[0.25, 1.0])
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    env = dict(os.environ, PYTHONPATH=str(args.repo))
    model = work / "tiny"
    subprocess.run([sys.executable, "-m", "openmoshi.cli.main", "init", "--preset", "tiny", str(model)], env=env,
                   check=True, stdout=subprocess.DEVNULL)
    rng = np.random.default_rng(0)
    print(f"repo {args.repo}")
    for minutes in args.minutes:
        wav = work / f"talk{minutes:g}.wav"
        with sf.SoundFile(wav, "w", 24_000, 1, "PCM_16") as f:
            for _ in range(int(minutes * 60)):
                f.write((rng.standard_normal(24_000) * 0.1).astype(np.float32))
        cmd = [sys.executable, "-m", "openmoshi.cli.main", "infer", "--model", str(model), str(wav), "--out",
               str(work / f"out{minutes:g}-{time.time_ns()}"), "--quiet", "--device", "cpu",
               "--threads", str(args.threads)]
        rss, seconds = peak_rss_mb(cmd, env)
        print(f"{minutes:6g} min of audio: peak RSS {rss:7.1f} MB, {seconds:6.1f} s", flush=True)


if __name__ == "__main__":
    main()
