"""A client that streams audio and never reads, for minutes: server RSS and outbox over time.

    PYTHONPATH=. python benchmarks/bench_stuck_reader.py --seconds 120

Runs a tiny-model server in this process and a raw-socket client with a small receive buffer that never
reads; prints RSS (MB), the session's outbox length and the frames it dropped every 10 s, then RSS after the
session ended. Real socket buffers (nothing shrunk): the kernel absorbs the first minutes of Moshi's ~3.5 KB/s.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_server_hardening import RawWebSocket, _rss_mb

from openmoshi.audio.opus import OpusEncoderStream
from openmoshi.bundle import init_model
from openmoshi.server.app import SESSIONS_KEY
from openmoshi.server.background import RunningServer
from openmoshi.server.limits import SessionLimits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--stall", type=float, default=600, help="send_stall_s of the server")
    args = parser.parse_args()
    model = init_model("tiny", Path(tempfile.mkdtemp()) / "tiny", seed=0)
    with RunningServer(model, max_sessions=2, limits=SessionLimits(send_stall_s=args.stall)) as srv:
        print(f"baseline rss {_rss_mb():.1f} MB", flush=True)
        client = RawWebSocket(srv.host, srv.port, "/api/chat")
        while not srv.app[SESSIONS_KEY]:
            time.sleep(0.01)
        (session,) = srv.app[SESSIONS_KEY]
        encoder, rng = OpusEncoderStream(), np.random.default_rng(0)
        start, i, last = time.monotonic(), 0, 0.0
        try:
            while time.monotonic() - start < args.seconds and srv.engine.active_sessions:
                data = encoder.push((rng.standard_normal(1920) * 0.1).astype(np.float32))
                if data:
                    client.send_binary(b"\x01" + data)
                i += 1
                time.sleep(max(0.0, start + i * 0.08 - time.monotonic()))
                if time.monotonic() - last >= 10:
                    last = time.monotonic()
                    print(f"t={last - start:5.0f}s rss {_rss_mb():.1f} MB outbox {len(session.outbox)} "
                          f"dropped {session.outbox.dropped} steps {srv.engine.metrics.steps}", flush=True)
        except OSError as exc:
            print(f"disconnected by the server: {exc}")
        client.close()
        time.sleep(1.0)
        print(f"after the session: rss {_rss_mb():.1f} MB, active sessions {srv.engine.active_sessions}, "
              f"closed because: {session.closed_because}")


if __name__ == "__main__":
    main()
