"""Real-time full-duplex server: Kyutai's websocket protocol at /api/chat, a web page at /.

  openmoshi serve --model tiny-moshi                      # after `openmoshi init --preset tiny tiny-moshi`
  openmoshi serve --model hf://kyutai/moshiko-pytorch-bf16 --device cuda
  openmoshi serve --model hf://kyutai/stt-1b-en_fr        # streaming ASR at /api/asr-streaming
  openmoshi serve --model hf://kyutai/tts-1.6b-en_fr --voice-dir tts-voices  # streaming TTS at /api/tts_streaming

stt and tts models serve the msgpack websockets of Kyutai's delayed-streams clients instead of /api/chat, as
does a Moshi-style model whose config.json delays make it ASR (text late) or TTS (audio late; paper §5.7).

Open http://127.0.0.1:8998 in a browser (microphones need localhost or HTTPS), or use Kyutai's web or
Python client, or `openmoshi client`. Conversations share one batched model step: --max-sessions slots.
Health at /health, Prometheus metrics at /metrics.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
from pathlib import Path

from ..server.limits import SessionLimits
from .common import (
    add_device_arguments,
    add_kv_cache_argument,
    add_quantize_argument,
    quantize_bits,
    resolve_device,
)

logger = logging.getLogger(__name__)

DSM_MESSAGE_KB = 1024  # default message limit of the ASR / TTS websockets


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="hf://kyutai/moshiko-pytorch-bf16",
                        help="model folder or hf://owner/repo in Kyutai's layout")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    parser.add_argument("--port", type=int, default=8998, help="port (default 8998, as Kyutai's server)")
    parser.add_argument("--max-sessions", type=int, default=4, help="concurrent conversations (batch slots)")
    parser.add_argument("--token", default=None,
                        help="shared secret clients must send (?token=, or Authorization: Bearer); "
                             "'auto' generates one. Use it whenever the server is reachable by others")
    parser.add_argument("--static", default=None, help="serve another web page folder at / instead of ours")
    parser.add_argument("--max-backlog", type=float, default=1.0,
                        help="seconds of user audio a session may queue before old audio is dropped")
    defaults = SessionLimits()
    parser.add_argument("--idle-timeout", type=float, default=defaults.idle_timeout_s,
                        help="seconds without audio from a client (nor answer to it) before its session is "
                             f"closed and its slot freed (default {defaults.idle_timeout_s:g})")
    parser.add_argument("--max-message-kb", type=float, default=None,
                        help="largest websocket message accepted, in KiB (default "
                             f"{defaults.max_message_bytes // 1024}: a 20 ms Opus page is ~0.1 KiB; stt/tts models "
                             f"{DSM_MESSAGE_KB}: Kyutai's ASR clients send a second of float PCM, ~120 KiB, at once)")
    parser.add_argument("--input-rate", type=float, default=defaults.input_rate,
                        help="seconds of audio a client may send per second, on average; faster clients are "
                             f"closed (default {defaults.input_rate:g})")
    parser.add_argument("--input-burst", type=float, default=defaults.input_burst_s,
                        help=f"seconds of audio a client may send ahead at once (default {defaults.input_burst_s:g})")
    tts = parser.add_argument_group("text-to-speech (tts models)")
    tts.add_argument("--voice-dir", type=Path, default=None,
                     help="folder of voice embeddings (e.g. a copy of kyutai/tts-voices); clients pick one with "
                          "?voice=NAME (a path inside it, `.safetensors` or Kyutai's `.<id>.safetensors` suffix "
                          "optional)")
    tts.add_argument("--voice", default=None, help="voice used when a client names none (a NAME of --voice-dir)")
    tts.add_argument("--tts-temp", type=float, default=0.6, help="sampling temperature (0 = greedy); clients may "
                                                                 "set ?temperature= (and ?top_k=, ?seed=, "
                                                                 "?max_seq_len=, ?voices=: see the README)")
    tts.add_argument("--cfg-coef", type=float, default=2.0, help="classifier-free guidance; clients may set "
                                                                 "?cfg_alpha=")
    tts.add_argument("--max-speech-seconds", type=float, default=300.0,
                     help="longest speech of one session (clients may ask for less with ?max_seq_len=STEPS)")
    add_device_arguments(parser)
    add_quantize_argument(parser)
    add_kv_cache_argument(parser)


def run(args: argparse.Namespace) -> int:
    import asyncio
    import dataclasses
    from urllib.parse import quote

    from ..bundle import load_model
    from ..server.app import STATIC_DIR, create_app, engine_for, served_as
    from ..server.engine import STANDING_QUEUE_S
    from ..server.runner import serve_until_signal
    from ..server.tts import TtsOptions

    limits = check_options(args)
    device, dtype = resolve_device(args)
    logger.info("loading %s on %s (%s)", args.model, device, dtype)
    bundle = load_model(args.model, device=device, dtype=dtype, quantize=quantize_bits(args),
                        kv_cache=args.kv_cache)
    family = served_as(bundle.config)
    if args.max_message_kb is None:
        kib = DSM_MESSAGE_KB if family in ("stt", "tts") else limits.max_message_bytes / 1024
        limits = dataclasses.replace(limits, max_message_bytes=int(kib * 1024))
    frames = max(1, round(args.max_backlog * bundle.mimi.frame_rate))
    options = TtsOptions(voice_dir=args.voice_dir, default_voice=args.voice, temperature=args.tts_temp,
                         cfg_coef=args.cfg_coef, max_seconds=args.max_speech_seconds)
    engine = engine_for(bundle, args.max_sessions, max_backlog_frames=frames, standing_queue_s=STANDING_QUEUE_S,
                        tts_options=options)
    token = secrets.token_urlsafe(16) if args.token == "auto" else args.token
    static = Path(args.static) if args.static else STATIC_DIR
    app = create_app(engine, token=token, static_dir=static, limits=limits)
    endpoint = {"stt": " (ASR at /api/asr-streaming)", "tts": " (TTS at /api/tts_streaming)"}.get(family, "")

    def announce(port: int) -> None:
        suffix = f"/?token={quote(token, safe='')}" if token else "/"
        print(f"openmoshi: serving {args.model} with {args.max_sessions} slot(s) on "
              f"http://{args.host}:{port}{suffix}{endpoint}", flush=True)
        if args.host not in ("127.0.0.1", "localhost", "::1") and not token:
            logger.warning("listening on %s without --token: anyone who can reach it can use it", args.host)

    asyncio.run(serve_until_signal(app, args.host, args.port, announce))
    # Every session is closed and the socket released: exit now. The interpreter's teardown of torch alone
    # takes seconds on a busy machine and has nothing left to clean up.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def check_options(args: argparse.Namespace) -> SessionLimits:
    """Every numeric option in range (before the model loads); the session limits they describe."""
    import math

    from ..errors import ConfigError

    def positive(name: str, value: float) -> float:
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{name} must be a positive number, got {value!r}")
        return value

    if args.max_sessions < 1:
        raise ConfigError(f"--max-sessions must be at least 1, got {args.max_sessions}")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535, got {args.port}")
    positive("--max-backlog", args.max_backlog)
    if args.max_backlog > 60:
        raise ConfigError(f"--max-backlog of {args.max_backlog:g} s would let a session lag a minute behind; "
                          "use at most 60")
    if args.static is not None and not Path(args.static).is_dir():
        raise ConfigError(f"--static {args.static}: no such folder")
    if args.token is not None and not args.token.strip():
        raise ConfigError("--token is empty: give a secret, or 'auto' to generate one")
    if args.voice_dir is not None and not args.voice_dir.is_dir():
        raise ConfigError(f"--voice-dir {args.voice_dir}: no such folder")
    if not 0 <= args.tts_temp <= 10:
        raise ConfigError(f"--tts-temp must be between 0 and 10, got {args.tts_temp}")
    positive("--cfg-coef", args.cfg_coef)
    positive("--max-speech-seconds", args.max_speech_seconds)
    kib = SessionLimits().max_message_bytes / 1024 if args.max_message_kb is None \
        else positive("--max-message-kb", args.max_message_kb)
    if kib < 1:
        raise ConfigError(f"--max-message-kb must be at least 1 (one Opus page), got {kib:g}")
    return SessionLimits(max_message_bytes=int(kib * 1024),
                         input_rate=positive("--input-rate", args.input_rate),
                         input_burst_s=positive("--input-burst", args.input_burst),
                         idle_timeout_s=positive("--idle-timeout", args.idle_timeout))
