"""Write deploy/nginx/openmoshi.conf for your backends (stdout, or --out FILE).

    python deploy/nginx/render_conf.py --listen 8000 --backend 127.0.0.1:8001 --backend 127.0.0.1:8002 \
        --backend gpu-host-2:8998=8 > /etc/nginx/conf.d/openmoshi.conf

A backend is HOST:PORT, with `=WEIGHT` (its --max-sessions) when the backends differ in size.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

TEMPLATE = Path(__file__).with_name("openmoshi.conf")
BLOCK = re.compile(r"(?P<indent>[ \t]*)# backends: begin\n.*?# backends: end\n", re.DOTALL)
BACKEND = re.compile(r"^(?P<address>\[[0-9a-fA-F:]+\]:\d+|[\w.-]+:\d+)(=(?P<weight>[1-9]\d*))?$")
LISTEN = re.compile(r"listen \S+;  # listen")


def render(backends: list[str], listen: str = "8000", max_fails: int = 3, fail_timeout_s: int = 10,
           template: str | None = None) -> str:
    """The config text for these backends ("host:port" or "host:port=weight"), listening on `listen`."""
    if not backends:
        raise ValueError("give at least one backend HOST:PORT")
    parsed = []
    for backend in backends:
        match = BACKEND.match(backend)
        if match is None:
            raise ValueError(f"backend {backend!r} is not HOST:PORT or HOST:PORT=WEIGHT (e.g. 127.0.0.1:8001=4)")
        parsed.append((match["address"], match["weight"]))
    text = TEMPLATE.read_text() if template is None else template
    if len(BLOCK.findall(text)) != 2 or len(LISTEN.findall(text)) != 1:
        raise ValueError(f"{TEMPLATE} must hold two '# backends: begin/end' blocks and one 'listen ...;  # listen'")
    # The first upstream marks failing backends down for a while; the last-try upstream never does.
    checks = iter([f"max_fails={max_fails} fail_timeout={fail_timeout_s}s", "max_fails=0"])

    def servers(match: re.Match) -> str:
        indent, check = match["indent"], next(checks)
        body = "".join(f"{indent}server {address}{f' weight={weight}' if weight else ''} {check};\n"
                       for address, weight in parsed)
        return f"{indent}# backends: begin\n{body}{indent}# backends: end\n"

    text = BLOCK.sub(servers, text)
    return LISTEN.sub(f"listen {listen};  # listen", text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", action="append", required=True,
                        help="HOST:PORT of an `openmoshi serve` (repeat); HOST:PORT=WEIGHT to weigh it")
    parser.add_argument("--listen", default="8000", help="nginx's listen address: PORT or HOST:PORT")
    parser.add_argument("--max-fails", type=int, default=3, help="failed tries before a backend is skipped")
    parser.add_argument("--fail-timeout", type=int, default=10, help="seconds a failing backend is skipped")
    parser.add_argument("--out", type=Path, default=None, help="write here instead of stdout")
    args = parser.parse_args()
    try:
        text = render(args.backend, args.listen, args.max_fails, args.fail_timeout)
    except ValueError as exc:
        parser.error(str(exc))
    if args.out is None:
        print(text, end="")
    else:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
