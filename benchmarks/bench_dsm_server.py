"""The streaming ASR / TTS websockets under concurrent clients: aggregate throughput as sessions are added.

    python benchmarks/bench_dsm_server.py --stt STT_FOLDER --tts TTS_FOLDER [--clients 1 2 4] [--threads 1]

ASR: each client sends `--seconds` of audio as fast as the server reads it (Kyutai's file client with a high
--rtf), then a Marker; the time until every Marker is back gives audio seconds transcribed per wall second.
TTS: each client sends a sentence word by word and Eos; the time until every server has closed gives audio
seconds generated per wall second, and the median time to the first Audio message. With batching, adding
clients should raise the aggregate rate (one step serves every session).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
import msgpack
import numpy as np
import torch

from openmoshi.checkpoint import save_safetensors
from openmoshi.server.background import RunningServer
from openmoshi.server.limits import SessionLimits
from openmoshi.server.tts import TtsOptions

SR = 24_000
TEXT = "Hello there, this is a test of the streaming text to speech server with several clients at once."


async def asr_client(url: str, seconds: float) -> None:
    pcm = (0.1 * np.sin(np.arange(int(seconds * SR)) * 0.05)).astype(np.float32)
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        async def send() -> None:
            for i in range(0, len(pcm), SR):
                await ws.send_bytes(msgpack.packb({"type": "Audio", "pcm": pcm[i:i + SR].tolist()},
                                                  use_single_float=True))
            await ws.send_bytes(msgpack.packb({"type": "Marker", "id": 1}))
            for _ in range(5):
                await ws.send_bytes(msgpack.packb({"type": "Audio", "pcm": [0.0] * SR}, use_single_float=True))

        sender = asyncio.create_task(send())
        async for message in ws:
            if msgpack.unpackb(message.data)["type"] == "Marker":
                break
        sender.cancel()


async def tts_client(url: str) -> tuple[float, float]:
    """(seconds to the first Audio message, seconds of audio)."""
    start, first, samples = time.perf_counter(), None, 0
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        for word in TEXT.split():
            await ws.send_bytes(msgpack.packb({"type": "Text", "text": word}))
        await ws.send_bytes(msgpack.packb({"type": "Eos"}))
        async for message in ws:
            data = msgpack.unpackb(message.data)
            if data["type"] == "Audio":
                first = first or time.perf_counter() - start
                samples += len(data["pcm"])
    return first or float("nan"), samples / SR


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stt", type=Path)
    parser.add_argument("--tts", type=Path)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seconds", type=float, default=10.0, help="audio per ASR client")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    limits = SessionLimits(max_message_bytes=1 << 20)
    most = max(args.clients)
    if args.stt:
        with RunningServer(args.stt, max_sessions=most, limits=limits, threads=None) as server:
            url = server.ws_base + "/api/asr-streaming"
            asyncio.run(asr_client(url, 2.0))  # first session: kernels, caches
            print("| ASR clients | wall s | audio s / wall s (all clients) | steps | frames per step |")
            print("| --- | --- | --- | --- | --- |")
            for n in args.clients:
                m = server.engine.metrics
                steps, frames = m.steps, m.frames_in
                start = time.perf_counter()

                async def run(n: int = n) -> None:
                    await asyncio.gather(*(asr_client(url, args.seconds) for _ in range(n)))

                asyncio.run(run())
                wall = time.perf_counter() - start
                print(f"| {n} | {wall:.2f} | {n * args.seconds / wall:.1f} | {m.steps - steps} | "
                      f"{(m.frames_in - frames) / max(m.steps - steps, 1):.2f} |")
    if args.tts:
        with tempfile.TemporaryDirectory() as voices:
            dim = 32 if "tiny" in args.tts.name else 512
            save_safetensors({"speaker_wavs": torch.randn(1, dim, 5)}, Path(voices) / "v.safetensors")
            options = TtsOptions(voice_dir=Path(voices), default_voice="v", temperature=0.0)
            with RunningServer(args.tts, max_sessions=most, limits=limits, threads=None,
                               tts_options=options) as server:
                url = server.ws_base + "/api/tts_streaming"
                asyncio.run(tts_client(url))
                print("| TTS clients | wall s | audio s / wall s (all clients) | first audio s (median) |")
                print("| --- | --- | --- | --- |")
                for n in args.clients:
                    start = time.perf_counter()

                    async def run(n: int = n) -> list[tuple[float, float]]:
                        return await asyncio.gather(*(tts_client(url) for _ in range(n)))

                    results = asyncio.run(run())
                    wall = time.perf_counter() - start
                    print(f"| {n} | {wall:.2f} | {sum(r[1] for r in results) / wall:.1f} | "
                          f"{statistics.median(r[0] for r in results):.2f} |")


if __name__ == "__main__":
    main()
