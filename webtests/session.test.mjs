import { test } from "node:test";
import assert from "node:assert/strict";
import { bytesEqual, fixture, randomChunks, rng, splitPagesByHeader } from "./helpers.mjs";
import { Kind, encodeMessage } from "../openmoshi/server/static/js/protocol.js";
import { MoshiSession, SILENCE_TIMEOUT_MS, State, streamStats } from "../openmoshi/server/static/js/session.js";
import { defaultSettings, resolveSeeds } from "../openmoshi/server/static/js/settings.js";

class FakeSocket {
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    this.bufferedAmount = 0;
    this.closedWith = null;
  }
  open() {
    this.readyState = 1;
    this.onopen?.({});
  }
  receive(frame) {
    // Browsers hand binary frames over as a fresh ArrayBuffer.
    this.onmessage?.({ data: frame.slice().buffer });
  }
  send(data) {
    if (this.readyState !== 1) throw new Error("send on a socket that is not open");
    this.sent.push(data);
  }
  close(code, reason) {
    this.closedWith = { code, reason };
    this.readyState = 3;
  }
  serverClose(code = 1000, reason = "") {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }
}

class FakeAudio {
  constructor() {
    this.calls = [];
    this.decoded = [];
    this.onPage = null;
    this.micError = null;
  }
  async prepare() {
    this.calls.push("prepare");
    return 48000;
  }
  async openMic(onPage) {
    this.calls.push("openMic");
    if (this.micError) throw this.micError;
    this.onPage = onPage;
  }
  decode(pages) {
    this.decoded.push(...pages);
  }
  close() {
    this.calls.push("close");
  }
}

class FakeTimers {
  constructor() {
    this.t = 0;
    this.intervals = new Map();
    this.next = 1;
  }
  now = () => this.t;
  setInterval = (fn, ms) => {
    const id = this.next++;
    this.intervals.set(id, { fn, ms, due: this.t + ms });
    return id;
  };
  clearInterval = (id) => this.intervals.delete(id);
  advance(ms) {
    const end = this.t + ms;
    while (true) {
      const next = [...this.intervals.entries()].sort((a, b) => a[1].due - b[1].due)[0];
      if (!next || next[1].due > end) break;
      this.t = next[1].due;
      next[1].due += next[1].ms;
      next[1].fn();
    }
    this.t = end;
  }
}

const tick = () => new Promise((r) => setImmediate(r));

async function startSession({ token = null } = {}) {
  const sockets = [];
  const audio = new FakeAudio();
  const timers = new FakeTimers();
  const session = new MoshiSession({
    createSocket: (url) => {
      const s = new FakeSocket(url);
      sockets.push(s);
      return s;
    },
    audio,
    pageHref: "http://localhost:8998/",
    token,
    now: timers.now,
    timers,
    log: { info() {}, warn() {} },
  });
  const states = [];
  session.subscribe((s) => {
    if (states.at(-1) !== s.state) states.push(s.state);
  });
  await session.start(resolveSeeds(defaultSettings(), () => 0.5));
  return { session, socket: sockets[0], audio, timers, states };
}

test("handshake gates the microphone and sending; states go connecting -> waiting -> connected", async () => {
  const { session, socket, audio, states } = await startSession();
  assert.match(socket.url, /^ws:\/\/localhost:8998\/api\/chat\?text_temperature=0\.7&text_topk=25&/);
  assert.match(socket.url, /text_seed=500000000&audio_seed=500000000/);
  assert.equal(socket.binaryType, "arraybuffer");
  assert.equal(session.state, State.CONNECTING);
  socket.open();
  assert.equal(session.state, State.WAITING);
  assert.deepEqual(audio.calls, ["prepare"]); // no microphone while waiting for a slot
  socket.receive(new Uint8Array([Kind.HANDSHAKE]));
  await tick();
  assert.equal(session.state, State.CONNECTED);
  assert.deepEqual(audio.calls, ["prepare", "openMic"]);
  assert.equal(session.debug.handshake.protocolVersion, null);
  audio.onPage(new Uint8Array([0x4f, 0x67, 0x67, 0x53, 1, 2]));
  assert.equal(socket.sent.length, 1);
  assert.deepEqual([...socket.sent[0]], [1, 0x4f, 0x67, 0x67, 0x53, 1, 2]);
  assert.deepEqual(session.debug.sent.audio, { messages: 1, bytes: 7 });
  assert.deepEqual(states, [State.CONNECTING, State.WAITING, State.CONNECTED]);
});

test("audio split anywhere reaches the decoder as whole pages; text builds the transcript", async () => {
  const { session, socket, audio } = await startSession();
  socket.open();
  socket.receive(new Uint8Array([0, 1, 0, 0, 0, 1, 0, 0, 0]));
  await tick();
  const ogg = fixture("sine440_24k_sphn.opus");
  const chunks = randomChunks(ogg, rng(3), 300);
  for (const c of chunks) socket.receive(encodeMessage(Kind.AUDIO, c));
  const words = [" Hello", ",", " how", " are", " you", "?"];
  for (const w of words) socket.receive(encodeMessage(Kind.TEXT, w));
  socket.receive(new Uint8Array([Kind.PING]));
  socket.receive(encodeMessage(Kind.METADATA, '{"text_temperature":0.7}'));

  const expected = splitPagesByHeader(ogg);
  assert.equal(audio.decoded.length, expected.length);
  assert.ok(audio.decoded.every((p, i) => bytesEqual(p, expected[i])));
  const d = session.debug;
  assert.equal(d.transcript, " Hello, how are you?");
  assert.deepEqual(d.received.audio, { messages: chunks.length, bytes: ogg.length + chunks.length });
  assert.deepEqual(d.received.text, { messages: 6, bytes: words.join("").length + 6 });
  assert.deepEqual(d.received.handshake, { messages: 1, bytes: 9 });
  assert.equal(d.received.ping.messages, 1);
  assert.deepEqual(d.metadata, { text_temperature: 0.7 });
  assert.equal(d.handshake.protocolVersion, 1);
  assert.equal(d.ogg.pages, expected.length);
  assert.equal(d.ogg.crcErrors, 0);
});

test("a busy error ends in the busy state and closes the socket", async () => {
  const { session, socket, audio } = await startSession();
  socket.open();
  socket.receive(encodeMessage(Kind.ERROR, "server is busy, try again later"));
  assert.equal(session.state, State.BUSY);
  assert.match(session.debug.detail, /busy/);
  assert.equal(socket.closedWith.code, 1000);
  assert.ok(audio.calls.includes("close"));
  assert.ok(!audio.calls.includes("openMic"));
  socket.serverClose(1000);
  assert.equal(session.state, State.BUSY); // the close that follows keeps the reason visible
});

test("other server errors, unknown kinds and text frames end in the error state", async () => {
  let ctx = await startSession();
  ctx.socket.open();
  ctx.socket.receive(encodeMessage(Kind.ERROR, "model crashed"));
  assert.equal(ctx.session.state, State.ERROR);
  assert.equal(ctx.session.debug.lastError, "model crashed");

  ctx = await startSession();
  ctx.socket.open();
  ctx.socket.receive(new Uint8Array([0]));
  await tick();
  ctx.socket.receive(new Uint8Array([9, 1, 2]));
  assert.equal(ctx.session.state, State.ERROR);
  assert.match(ctx.session.debug.detail, /unknown message kind 9/);
  assert.equal(ctx.session.debug.protocolErrors, 1);
  assert.equal(ctx.socket.closedWith.code, 4000);

  ctx = await startSession();
  ctx.socket.open();
  ctx.socket.onmessage({ data: "hello" });
  assert.equal(ctx.session.state, State.ERROR);
  assert.match(ctx.session.debug.detail, /binary frames only/);
});

test("microphone refused after the handshake: error with the message, socket closed", async () => {
  const { session, socket, audio } = await startSession();
  audio.micError = new Error("Microphone access was denied.");
  socket.open();
  socket.receive(new Uint8Array([0]));
  await tick();
  assert.equal(session.state, State.ERROR);
  assert.equal(session.debug.detail, "Microphone access was denied.");
  assert.ok(socket.closedWith);
});

test("closes: refused connection, closed while waiting, closed while talking, stopped by the user", async () => {
  let ctx = await startSession();
  ctx.socket.serverClose(1006);
  assert.equal(ctx.session.state, State.ERROR);
  assert.match(ctx.session.debug.detail, /could not connect/);

  ctx = await startSession();
  ctx.socket.open();
  ctx.socket.serverClose(1001, "shutting down");
  assert.equal(ctx.session.state, State.CLOSED);
  assert.match(ctx.session.debug.detail, /before a slot was free.*1001: shutting down/);

  ctx = await startSession();
  ctx.socket.open();
  ctx.socket.receive(new Uint8Array([0]));
  await tick();
  ctx.socket.serverClose(1000);
  assert.equal(ctx.session.state, State.CLOSED);
  ctx.audio.onPage(new Uint8Array([1])); // late encoder output is not sent
  assert.equal(ctx.socket.sent.length, 0);

  ctx = await startSession();
  ctx.socket.open();
  await ctx.session.stop("stopped by you");
  assert.equal(ctx.session.state, State.CLOSED);
  assert.equal(ctx.socket.closedWith.code, 1000);
  assert.equal(ctx.session.debug.detail, "stopped by you");
  assert.ok(ctx.session.debug.endedAt !== null);
});

test("10 s without a message after the handshake is an error; no timeout while waiting for a slot", async () => {
  const { session, socket, timers } = await startSession();
  socket.open();
  timers.advance(60_000);
  assert.equal(session.state, State.WAITING);
  socket.receive(new Uint8Array([0]));
  await tick();
  timers.advance(SILENCE_TIMEOUT_MS - 1000);
  socket.receive(new Uint8Array([Kind.PING]));
  timers.advance(SILENCE_TIMEOUT_MS - 1000);
  assert.equal(session.state, State.CONNECTED);
  timers.advance(2500);
  assert.equal(session.state, State.ERROR);
  assert.match(session.debug.detail, /no data from the server for 10 s/);
});

test("the token from the page URL is sent but not shown", async () => {
  const { session, socket } = await startSession({ token: "abc123" });
  assert.equal(new URL(socket.url).searchParams.get("token"), "abc123");
  assert.ok(!session.debug.url.includes("abc123"));
});

test("a second start while running is refused; a new start resets the counters", async () => {
  const { session, socket } = await startSession();
  await assert.rejects(session.start(defaultSettings()), /already running/);
  socket.open();
  socket.receive(new Uint8Array([0]));
  await tick();
  socket.receive(encodeMessage(Kind.TEXT, " hi"));
  const debug = session.debug;
  await session.stop();
  await session.start(resolveSeeds(defaultSettings()));
  assert.equal(session.debug, debug); // same live object for window.moshiDebug
  assert.equal(debug.transcript, "");
  assert.equal(debug.received.text.messages, 0);
});

test("stop while the audio is being prepared ends closed, without opening a socket", async () => {
  const audio = new FakeAudio();
  let release;
  audio.prepare = () => new Promise((_, reject) => (release = () => reject(new Error("stopped"))));
  const sockets = [];
  const session = new MoshiSession({
    createSocket: (url) => sockets.push(url), audio, pageHref: "http://localhost:8998/", log: { warn() {} },
  });
  const started = session.start(resolveSeeds(defaultSettings()));
  await session.stop("stopped by you");
  release();
  await started;
  assert.equal(session.state, State.CLOSED);
  assert.equal(sockets.length, 0);
});

test("missing parameters are an error, not a hang", async () => {
  const session = new MoshiSession({
    createSocket: () => assert.fail("no socket expected"), audio: new FakeAudio(), pageHref: "http://localhost:8998/",
  });
  const params = resolveSeeds(defaultSettings());
  delete params.audio_topk;
  await session.start(params);
  assert.equal(session.state, State.ERROR);
  assert.match(session.debug.detail, /audio_topk/);
});

test("the server's stream status turns live into behind with missed audio and latency, and back", async () => {
  const { session, socket, audio } = await startSession();
  socket.open();
  socket.receive(new Uint8Array([Kind.HANDSHAKE]));
  await tick();
  assert.equal(session.debug.detail, "live: talk to Moshi");
  session.mergeAudioStats({ samplesDropped: 4800, bufferedMs: 120 });
  const meta = (stream) => encodeMessage(Kind.METADATA, new TextEncoder().encode(JSON.stringify({ slot: 0, stream })));
  socket.receive(meta({ state: "behind", missed_audio_s: 1.4, latency_s: 0.3, queued_s: 0.4 }));
  assert.equal(session.state, State.CONNECTED); // still talking: the microphone keeps sending
  assert.deepEqual(session.debug.stream, { state: "behind", missedAudioS: 1.4, latencyS: 0.3 });
  const stats = streamStats(session.debug);
  assert.equal(stats.behind, true);
  assert.ok(Math.abs(stats.missedAudioS - 1.5) < 1e-9); // 1.4 s dropped by the server + 0.1 s at 48 kHz here
  assert.ok(Math.abs(stats.latencyMs - 420) < 1e-9); // 300 ms at the server + 120 ms buffered here
  assert.equal(session.debug.detail, "behind: the server is dropping audio to keep up (1.5 s missed, latency 420 ms)");
  audio.onPage(new Uint8Array([0x4f, 0x67, 0x67, 0x53]));
  assert.equal(socket.sent.length, 1);
  socket.receive(meta({ state: "live", missed_audio_s: 1.4, latency_s: 0.05 }));
  assert.equal(session.debug.detail, "live: talk to Moshi");
  assert.equal(streamStats(session.debug).behind, false);
  socket.receive(meta({ state: "behind", missed_audio_s: "x", latency_s: -1 })); // nonsense counts as zero
  assert.deepEqual(session.debug.stream, { state: "behind", missedAudioS: 0, latencyS: 0 });
});
