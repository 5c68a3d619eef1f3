"""Real-time full-duplex server: Kyutai's websocket protocol at /api/chat, a web page at /.

  openmoshi serve --model tiny-moshi                      # after `openmoshi init --preset tiny tiny-moshi`
  openmoshi serve --model hf://kyutai/moshiko-pytorch-bf16 --device cuda

Open http://127.0.0.1:8998 in a browser (microphones need localhost or HTTPS), or use Kyutai's web or
Python client, or `openmoshi client`. Conversations share one batched model step: --max-sessions slots.
Health at /health, Prometheus metrics at /metrics.
"""

from __future__ import annotations

import argparse
import logging
import secrets

from .common import add_device_arguments, add_quantize_argument, quantize_bits, resolve_device

logger = logging.getLogger(__name__)


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
    add_device_arguments(parser)
    add_quantize_argument(parser)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from aiohttp import web

    from ..bundle import load_model
    from ..errors import ConfigError
    from ..server.app import STATIC_DIR, create_app
    from ..server.engine import Engine
    from ..server.protocol import SessionSettings

    if args.max_sessions < 1:
        raise ConfigError("--max-sessions must be at least 1")
    device, dtype = resolve_device(args)
    logger.info("loading %s on %s (%s)", args.model, device, dtype)
    bundle = load_model(args.model, device=device, dtype=dtype, quantize=quantize_bits(args))
    gen = bundle.generation
    defaults = SessionSettings(text_temperature=gen["temp_text"], text_topk=gen["top_k_text"],
                               audio_temperature=gen["temp"], audio_topk=gen["top_k"])
    frames = max(1, round(args.max_backlog * bundle.mimi.frame_rate))
    engine = Engine(bundle, args.max_sessions, defaults, max_backlog_frames=frames)
    token = secrets.token_urlsafe(16) if args.token == "auto" else args.token
    static = Path(args.static) if args.static else STATIC_DIR
    app = create_app(engine, token=token, static_dir=static)
    suffix = f"/?token={token}" if token else "/"
    print(f"openmoshi: serving {args.model} with {args.max_sessions} slot(s) on http://{args.host}:{args.port}{suffix}",
          flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not token:
        logger.warning("listening on %s without --token: anyone who can reach it can use it", args.host)
    web.run_app(app, host=args.host, port=args.port, print=None)
    return 0
