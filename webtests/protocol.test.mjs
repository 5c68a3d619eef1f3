import { test } from "node:test";
import assert from "node:assert/strict";
import {
  KIND_NAMES, Kind, ProtocolError, QUERY_PARAMS, buildChatUrl, decodeMessage, encodeMessage, isBusyError,
} from "../openmoshi/server/static/js/protocol.js";

const bytes = (...xs) => new Uint8Array(xs);
const PARAMS = {
  text_temperature: 0.7, text_topk: 25, audio_temperature: 0.8, audio_topk: 250, pad_mult: 0,
  text_seed: 123, audio_seed: 456, repetition_penalty_context: 64, repetition_penalty: 1.0,
};

test("kind numbers are Kyutai's", () => {
  assert.deepEqual(
    [Kind.HANDSHAKE, Kind.AUDIO, Kind.TEXT, Kind.CONTROL, Kind.METADATA, Kind.ERROR, Kind.PING, Kind.COLORED_TEXT],
    [0, 1, 2, 3, 4, 5, 6, 7],
  );
  assert.equal(KIND_NAMES.length, 8);
});

test("unknown kinds and empty frames are rejected", () => {
  for (const k of [8, 9, 42, 255]) {
    assert.throws(() => decodeMessage(bytes(k, 1, 2)), (e) => e instanceof ProtocolError && /unknown message kind/.test(e.message));
  }
  assert.throws(() => decodeMessage(new Uint8Array(0)), ProtocolError);
  assert.throws(() => decodeMessage("hello"), ProtocolError);
  assert.throws(() => encodeMessage(8, bytes(1)), ProtocolError);
});

test("handshake: one byte (Python server) or 1+8 bytes (Rust server)", () => {
  const short = decodeMessage(bytes(0));
  assert.equal(short.name, "handshake");
  assert.equal(short.protocolVersion, null);
  const long = decodeMessage(bytes(0, 1, 0, 0, 0, 2, 1, 0, 0));
  assert.equal(long.protocolVersion, 1);
  assert.equal(long.modelVersion, 258);
  assert.equal(long.size, 9);
});

test("audio payload is passed through untouched, also from an ArrayBuffer with offset views", () => {
  const buf = new Uint8Array([99, 1, 0x4f, 0x67, 0x67, 0x53, 5]).buffer;
  const msg = decodeMessage(new Uint8Array(buf, 1));
  assert.equal(msg.kind, Kind.AUDIO);
  assert.deepEqual([...msg.payload], [0x4f, 0x67, 0x67, 0x53, 5]);
  assert.equal(decodeMessage(new Uint8Array([1, 7]).buffer).payload[0], 7);
});

test("text, colored text, error, control, metadata, ping", () => {
  const text = decodeMessage(encodeMessage(Kind.TEXT, " héllo 👋"));
  assert.equal(text.text, " héllo 👋");
  const colored = decodeMessage(bytes(7, 3, 0x68, 0x69));
  assert.equal(colored.color, 3);
  assert.equal(colored.text, "hi");
  assert.equal(decodeMessage(encodeMessage(Kind.ERROR, "server busy")).text, "server busy");
  assert.equal(decodeMessage(bytes(3, 1)).action, "endTurn");
  assert.deepEqual(decodeMessage(encodeMessage(Kind.METADATA, '{"model":"moshi","n":1}')).data, { model: "moshi", n: 1 });
  assert.throws(() => decodeMessage(encodeMessage(Kind.METADATA, "{oops")), ProtocolError);
  assert.equal(decodeMessage(bytes(6)).name, "ping");
});

test("encodeMessage puts the kind first", () => {
  const frame = encodeMessage(Kind.AUDIO, bytes(10, 20, 30));
  assert.deepEqual([...frame], [1, 10, 20, 30]);
  assert.deepEqual([...encodeMessage(Kind.HANDSHAKE)], [0]);
});

test("chat URL: same host, ws/wss, every parameter in order, optional token", () => {
  const http = new URL(buildChatUrl("http://127.0.0.1:8998/", PARAMS));
  assert.equal(http.protocol, "ws:");
  assert.equal(http.host, "127.0.0.1:8998");
  assert.equal(http.pathname, "/api/chat");
  assert.deepEqual([...http.searchParams.keys()], QUERY_PARAMS);
  assert.equal(http.searchParams.get("text_seed"), "123");
  assert.equal(http.searchParams.get("repetition_penalty"), "1");
  assert.equal(http.searchParams.get("token"), null);

  const https = new URL(buildChatUrl("https://moshi.example.org/?token=abc#x", PARAMS, "s3cr&t"));
  assert.equal(https.protocol, "wss:");
  assert.equal(https.pathname, "/api/chat");
  assert.equal(https.searchParams.get("token"), "s3cr&t");
  assert.equal(https.hash, "");

  assert.throws(() => buildChatUrl("http://localhost/", { ...PARAMS, audio_topk: undefined }), /audio_topk/);
});

test("busy detection", () => {
  assert.equal(isBusyError("Server is busy, try again later"), true);
  assert.equal(isBusyError("BUSY"), true);
  assert.equal(isBusyError("no free slot"), true);
  assert.equal(isBusyError("invalid parameter text_topk"), false);
});
