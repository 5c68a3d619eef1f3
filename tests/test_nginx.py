"""Scale-out on standard parts (issue #17): two servers behind a real nginx with deploy/nginx/openmoshi.conf.

Conversations spread over both backends (least_conn), a backend that is down is skipped, a full backend sends the
upgrade elsewhere (HTTP 503 that nginx retries), and when every backend is full the client hears a clear "server
busy" through nginx.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import read_speech

from openmoshi.bundle import init_model
from openmoshi.client import ServerBusy, converse
from openmoshi.server import protocol
from openmoshi.server.background import RunningServer
from openmoshi.server.limits import SessionLimits

REPO = Path(__file__).resolve().parents[1]
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                       if os.access(p, os.X_OK)), None)
needs_nginx = pytest.mark.skipif(NGINX is None, reason="the nginx binary is absent (Debian: apt-get install nginx)")


def _render_conf():
    spec = importlib.util.spec_from_file_location("render_conf", REPO / "deploy" / "nginx" / "render_conf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.render


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@contextlib.contextmanager
def running_nginx(site_conf: str, folder: Path, port: int):
    """nginx in the foreground as this user, everything (pid, logs, temp files) under `folder`."""
    (folder / "openmoshi.conf").write_text(site_conf)
    main_conf = f"""
{"user root;" if os.geteuid() == 0 else ""}
daemon off;
worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {folder}/access.log;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    include {folder}/openmoshi.conf;
}}
"""
    (folder / "nginx.conf").write_text(main_conf)
    proc = subprocess.Popen([NGINX, "-p", str(folder), "-c", str(folder / "nginx.conf"), "-e",
                             str(folder / "error.log")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"nginx exited: {proc.stdout.read()}"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            time.sleep(0.1)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return init_model("tiny", tmp_path_factory.mktemp("model") / "tiny", seed=11)


def test_render_conf_lists_every_backend():
    conf = _render_conf()(["127.0.0.1:8001", "gpu-2:8998=8"], listen="127.0.0.1:9000")
    assert conf.count("server 127.0.0.1:8001 max_fails=3 fail_timeout=10s;") == 1
    assert conf.count("server gpu-2:8998 weight=8 max_fails=0;") == 1  # the last-try upstream
    assert "listen 127.0.0.1:9000;" in conf and "least_conn;" in conf
    with pytest.raises(ValueError, match="HOST:PORT"):
        _render_conf()(["8001"])


def test_full_server_sends_the_balancer_elsewhere(tiny_model, speech_files):
    """With the balancer's header a full server answers the upgrade with 503; without it, inside the websocket."""
    import aiohttp

    from openmoshi.server.app import RETRY_HEADER

    user = read_speech(speech_files[0], 2.0)[0].numpy()

    async def attempt_while_full(url: str) -> tuple[int, BaseException | None]:
        held = asyncio.create_task(converse(url, user, timeout_s=20))
        await asyncio.sleep(0.8)  # the one slot is taken
        async with aiohttp.ClientSession() as session:
            try:
                await session.ws_connect(url, headers={RETRY_HEADER: "1"})
                status = 101
            except aiohttp.WSServerHandshakeError as exc:
                status = exc.status
        try:
            await converse(url, user[:24_000], timeout_s=10)
            refusal = None
        except ServerBusy as exc:
            refusal = exc
        conv = await held
        assert conv.errors == [] and len(conv.pcm) > 0
        return status, refusal

    with RunningServer(tiny_model, max_sessions=1, max_backlog_frames=None, standing_queue_s=None) as srv:
        status, refusal = asyncio.run(attempt_while_full(srv.url))
        assert status == 503
        assert srv.engine.metrics.sessions_sent_elsewhere == 1 and srv.engine.metrics.sessions_rejected == 1
    assert isinstance(refusal, ServerBusy) and "every conversation slot (1)" in str(refusal)


@needs_nginx
def test_two_servers_behind_nginx(tiny_model, speech_files, tmp_path):
    user = [read_speech(path, 3.0)[0].numpy() for path in speech_files]
    with contextlib.ExitStack() as stack:
        # Backend a has one slot, b three: four conversations fit only if nginx retries a full backend.
        # Late input waits rather than being dropped: on a loaded machine every answer still comes back whole.
        a = stack.enter_context(RunningServer(tiny_model, max_sessions=1, max_backlog_frames=None,
                                              standing_queue_s=None))
        b = stack.enter_context(RunningServer(tiny_model, max_sessions=3, max_backlog_frames=None,
                                              standing_queue_s=None))
        port, dead = _free_port(), _free_port()  # dead: a backend that is down (nothing listens there)
        backends = [f"127.0.0.1:{dead}", f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"]
        conf = _render_conf()(backends, listen=f"127.0.0.1:{port}")
        stack.enter_context(running_nginx(conf, tmp_path, port))
        url = f"ws://127.0.0.1:{port}/api/chat"

        status, body = _get(f"http://127.0.0.1:{port}/health")  # /health through nginx
        assert status == 200 and json.loads(body)["status"] == "ok", body

        async def talk():
            async def late_one() -> BaseException | None:
                await asyncio.sleep(1.0)  # the four are mid-conversation: every slot is taken
                try:
                    await converse(url, user[0][:24_000], timeout_s=15)
                except ServerBusy as exc:
                    return exc
                return None
            return await asyncio.gather(*(converse(url, pcm, timeout_s=20) for pcm in user), late_one())

        *convs, refusal = asyncio.run(talk())

        for conv in convs:
            assert conv.errors == []
            assert conv.handshake == protocol.handshake()[1:]
            sent = 3.0 * 24_000 + 0.5 * 24_000
            assert abs(len(conv.pcm) - sent) <= 4 * 1920, len(conv.pcm)  # all of Moshi's answer, through nginx
            assert np.abs(conv.pcm).max() > 0 and len(conv.pieces) > 0
        # least_conn spread them; the full backend answered 503 and nginx went on to the other one.
        assert a.engine.metrics.sessions_started == 1 and b.engine.metrics.sessions_started == 3
        assert a.engine.metrics.sessions_sent_elsewhere >= 1
        # Everything full: the last try reaches a backend, which refuses inside the websocket, in words.
        assert isinstance(refusal, ServerBusy) and "every conversation slot" in str(refusal), refusal
        assert a.engine.metrics.sessions_rejected + b.engine.metrics.sessions_rejected == 1
        status, body = _get(f"http://127.0.0.1:{port}/health")
        assert status == 200 and json.loads(body)["sessions"] == 0


@needs_nginx
def test_streaming_asr_through_nginx(tmp_path, speech_files):
    # The DSM websockets go through the same location as /api/chat: a full backend answers the retry header
    # with 503 and nginx moves on.
    import aiohttp
    import msgpack

    stt = init_model("tiny-stt", tmp_path / "stt", seed=0)
    pcm = read_speech(speech_files[0], 2.0)[0].numpy()
    with contextlib.ExitStack() as stack:
        limits = SessionLimits(max_message_bytes=1 << 20)  # as `openmoshi serve` sets it for stt models
        a = stack.enter_context(RunningServer(stt, max_sessions=1, limits=limits))
        b = stack.enter_context(RunningServer(stt, max_sessions=1, limits=limits))
        port = _free_port()
        conf = _render_conf()([f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"], listen=f"127.0.0.1:{port}")
        stack.enter_context(running_nginx(conf, tmp_path, port))
        url = f"ws://127.0.0.1:{port}/api/asr-streaming"

        async def transcribe(hold: asyncio.Event | None = None) -> list[str]:
            kinds = []
            async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
                for i in range(0, len(pcm), 1920):
                    await ws.send_bytes(msgpack.packb({"type": "Audio", "pcm": pcm[i:i + 1920].tolist()}))
                await ws.send_bytes(msgpack.packb({"type": "Marker", "id": 1}))
                for _ in range(4):
                    await ws.send_bytes(msgpack.packb({"type": "Audio", "pcm": [0.0] * 24_000}))
                async for message in ws:
                    kinds.append(msgpack.unpackb(message.data)["type"])
                    if kinds[-1] in ("Marker", "Error"):
                        break
                if hold is not None:
                    await hold.wait()
            return kinds

        async def both() -> list[list[str]]:
            hold = asyncio.Event()
            first = asyncio.create_task(transcribe(hold))  # keeps its slot until the second one is done
            await asyncio.sleep(0.5)
            second = await transcribe()
            hold.set()
            return [await first, second]

        for kinds in asyncio.run(both()):
            assert kinds[0] == "Ready" and kinds[-1] == "Marker", kinds
        assert a.engine.metrics.sessions_started == 1 and b.engine.metrics.sessions_started == 1
