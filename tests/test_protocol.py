"""Message framing and query-parameter parsing of the chat protocol."""

from __future__ import annotations

import pytest

from openmoshi.errors import ProtocolError
from openmoshi.server import protocol
from openmoshi.server.protocol import Kind, SessionSettings

DEFAULTS = SessionSettings(text_temperature=0.7, text_topk=25, audio_temperature=0.8, audio_topk=250)


def test_web_client_query_is_parsed():
    query = {"text_temperature": "0.5", "text_topk": "10", "audio_temperature": "0", "audio_topk": "250.0",
             "pad_mult": "0", "text_seed": "18446744073709", "audio_seed": "-1", "repetition_penalty": "1",
             "repetition_penalty_context": "64", "email": "ignored@example.org"}
    s = SessionSettings.from_query(query, DEFAULTS)
    assert (s.text_temperature, s.text_topk, s.audio_temperature, s.audio_topk) == (0.5, 10, 0.0, 250)
    assert s.text_seed == 18446744073709 and s.audio_seed is None
    assert s.ignored == []
    assert SessionSettings.from_query({"pad_mult": "1.5"}, DEFAULTS).ignored == ["pad_mult"]


@pytest.mark.parametrize("name,raw", [("text_temperature", "hot"), ("text_topk", "-3"), ("audio_temperature", "nan"),
                                      ("audio_topk", "inf"), ("text_seed", "-5")])
def test_bad_query_values_are_refused(name, raw):
    with pytest.raises(ProtocolError, match=name):
        SessionSettings.from_query({name: raw}, DEFAULTS)


def test_client_messages():
    assert protocol.parse_client_message(b"\x01OggS") == (Kind.AUDIO, b"OggS")
    for bad in (b"", b"\x09x", b"\x00", b"\x02hi", b"\x05err", b"\x01" + bytes(protocol.MAX_MESSAGE_BYTES)):
        with pytest.raises(ProtocolError):
            protocol.parse_client_message(bad)


def test_server_messages():
    assert protocol.handshake() == b"\x00" + bytes(8)
    assert protocol.text_piece("\u2581hello") == b"\x02 hello"
    assert protocol.error("busy") == b"\x05busy"
    assert protocol.metadata({"a": 1}) == b'\x04{"a": 1}'
