"""Talk to an openmoshi (or Kyutai) server from the terminal.

  openmoshi client --input question.wav --out answer/     # stream a file at real-time pace, save the answer
  openmoshi client                                        # microphone and speaker (needs `sounddevice`)

With --input, the file (any format, rate, channels) is streamed in 80 ms Ogg-Opus chunks at real-time
pace, and what comes back is written to OUT: moshi.wav (Moshi's voice), transcript.json (text pieces with
arrival times) and metadata.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="ws://127.0.0.1:8998/api/chat", help="chat websocket URL")
    parser.add_argument("--input", type=Path, default=None, help="audio file to stream (default: microphone)")
    parser.add_argument("--out", type=Path, default=Path("moshi-client-out"), help="folder for what comes back")
    parser.add_argument("--fast", action="store_true", help="send the file faster than real time (5 s at once, then 1.5x: "
                             "the server closes clients that run far ahead)")
    parser.add_argument("--token", default=None, help="server token, if it was started with --token")
    for name, kind in (("text_temperature", float), ("text_topk", int), ("audio_temperature", float),
                       ("audio_topk", int), ("text_seed", int), ("audio_seed", int)):
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None,
                            help=f"sampling setting sent to the server ({name})")


def _params(args: argparse.Namespace) -> dict:
    names = ("text_temperature", "text_topk", "audio_temperature", "audio_topk", "text_seed", "audio_seed")
    params = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if args.token:
        params["token"] = args.token
    return params


def run(args: argparse.Namespace) -> int:
    import torch

    from .common import default_threads, usable_cores
    # The client's work is Opus and audio; torch (resampling) must not spin up a worker per core beside the
    # server or a browser on the same machine.
    torch.set_num_threads(default_threads(usable_cores(), "client"))
    if args.input is None:
        return _run_microphone(args)
    from ..audio.io import load_audio, save_wav
    from ..client import converse
    audio = load_audio(args.input)
    for note in audio.notes:
        print(f"{args.input}: {note}")
    conv = asyncio.run(converse(args.url, audio.wav[0].numpy(), realtime=not args.fast, params=_params(args),
                                on_piece=lambda p: print(p, end="", flush=True)))
    print()
    args.out.mkdir(parents=True, exist_ok=True)
    save_wav(args.out / "moshi.wav", conv.pcm, 24_000)
    (args.out / "transcript.json").write_text(json.dumps(
        {"text": conv.text, "pieces": [{"time": round(t, 3), "text": p} for t, p in conv.pieces]}, indent=2))
    (args.out / "metadata.json").write_text(json.dumps(conv.metadata, indent=2))
    print(f"received {len(conv.pcm) / 24_000:.2f} s of audio and {len(conv.pieces)} text pieces -> {args.out}")
    for error in conv.errors:
        print(f"server error: {error}", file=sys.stderr)
    return 1 if conv.errors else 0


def _run_microphone(args: argparse.Namespace) -> int:
    """Full duplex from the terminal: microphone chunks go out as they are captured, Moshi plays as it comes."""
    import collections

    from ..errors import OpenMoshiError
    try:
        import sounddevice as sd
    except (ImportError, OSError) as exc:
        raise OpenMoshiError("microphone mode needs the `sounddevice` package and an audio device "
                             f"({exc}); or pass --input FILE") from exc
    from ..client import converse

    playback: collections.deque = collections.deque()

    def play(out, frames, *_):
        data = np.zeros(frames, dtype=np.float32)
        filled = 0
        while playback and filled < frames:
            chunk = playback[0]
            take = min(frames - filled, len(chunk))
            data[filled:filled + take] = chunk[:take]
            filled += take
            if take == len(chunk):
                playback.popleft()
            else:
                playback[0] = chunk[take:]
        out[:, 0] = data

    async def talk() -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def captured(data, *_):
            loop.call_soon_threadsafe(queue.put_nowait, data[:, 0].copy())

        async def microphone():
            while True:
                yield await queue.get()

        with sd.InputStream(samplerate=24_000, channels=1, dtype="float32", blocksize=1920, callback=captured), \
                sd.OutputStream(samplerate=24_000, channels=1, dtype="float32", blocksize=1920, callback=play):
            print("connected: talk to Moshi, Ctrl+C to stop")
            await converse(args.url, microphone(), params=_params(args), on_audio=playback.append,
                           on_piece=lambda p: print(p, end="", flush=True))

    try:
        asyncio.run(talk())
    except KeyboardInterrupt:
        print()
    return 0
