// One conversation with Moshi: websocket, handshake, message routing, state and counters.
// The audio side is injected (js/audio-io.js in the browser, a fake in node tests), so this file has no
// DOM or Web Audio dependency.

import { Kind, KIND_NAMES, ProtocolError, buildChatUrl, decodeMessage, encodeMessage, isBusyError } from "./protocol.js";
import { OggPageAssembler } from "./ogg.js";

/**
 * States, in the order a normal conversation goes through them:
 *   idle -> connecting -> waiting (socket open, no handshake: waiting for a free slot) -> connected -> closed
 * and the two ways it can fail: busy (the server said every slot is taken), error.
 */
export const State = Object.freeze({
  IDLE: "idle",
  CONNECTING: "connecting",
  WAITING: "waiting",
  CONNECTED: "connected",
  BUSY: "busy",
  ERROR: "error",
  CLOSED: "closed",
});

/** The server stopped talking: the official client gives up after 10 s without a message. */
export const SILENCE_TIMEOUT_MS = 10_000;

/** Mic pages are dropped rather than queued once the socket holds this much unsent data. */
export const MAX_SEND_BACKLOG_BYTES = 256 * 1024;

/** A fresh counters object; window.moshiDebug points at the live one. */
export function newDebugCounters() {
  const received = {};
  for (const name of KIND_NAMES) received[name] = { messages: 0, bytes: 0 };
  return {
    state: State.IDLE,
    detail: "",
    url: null,
    params: null,
    handshake: null,
    received, // by kind name: handshake, audio, text, control, metadata, error, ping, coloredText
    sent: { audio: { messages: 0, bytes: 0 }, droppedAudioPages: 0 },
    ogg: { pages: 0, crcErrors: 0, skippedBytes: 0 },
    audio: {
      sampleRate: null,
      samplesDecoded: 0,
      samplesPlayed: 0,
      secondsPlayed: 0,
      bufferedMs: 0,
      samplesDropped: 0,
      underruns: 0,
      micLevel: 0,
      moshiLevel: 0,
      recordedSeconds: 0,
    },
    transcript: "",
    metadata: null,
    // The server's word on our stream (metadata `stream`): "live", or "behind" when it drops our audio.
    stream: { state: "live", missedAudioS: 0, latencyS: 0 },
    lastControl: null,
    protocolErrors: 0,
    lastError: null,
    startedAt: null,
    connectedAt: null,
    endedAt: null,
  };
}

/**
 * Missed audio and latency as Kyutai's client shows them, from both ends: the server's dropped input and its
 * step latency, plus this page's playback gaps and buffer.
 */
export function streamStats(d) {
  const rate = d.audio.sampleRate || 0;
  const playbackMissedS = rate ? d.audio.samplesDropped / rate : 0;
  return {
    behind: d.stream.state === "behind",
    missedAudioS: d.stream.missedAudioS + playbackMissedS,
    latencyMs: d.stream.latencyS * 1000 + d.audio.bufferedMs,
  };
}

/** The detail line of a running conversation: "live", or "behind" with what was missed. */
export function liveDetail(d) {
  const s = streamStats(d);
  if (!s.behind) return "live: talk to Moshi";
  return `behind: the server is dropping audio to keep up (${s.missedAudioS.toFixed(1)} s missed, ` +
    `latency ${s.latencyMs.toFixed(0)} ms)`;
}

export class MoshiSession {
  /**
   * @param {{
   *   createSocket: (url: string) => WebSocket,
   *   audio: {prepare(): Promise<number>, openMic(onPage: (page: Uint8Array) => void): Promise<void>,
   *           decode(pages: Uint8Array[]): void, close(): Promise<void>|void, onStats?: Function},
   *   pageHref: string,
   *   token?: string|null,
   *   now?: () => number,
   *   timers?: {setInterval: Function, clearInterval: Function},
   *   log?: {info: Function, warn: Function},
   * }} deps
   */
  constructor({ createSocket, audio, pageHref, token = null, now = () => Date.now(), timers = globalThis, log = console }) {
    this.createSocket = createSocket;
    this.audio = audio;
    this.pageHref = pageHref;
    this.token = token;
    this.now = now;
    this.timers = timers;
    this.log = log;
    this.debug = newDebugCounters();
    this.socket = null;
    this.ogg = null;
    this.lastMessageAt = 0;
    this.watchdog = null;
    this.listeners = new Set();
    this.textListeners = new Set();
  }

  get state() {
    return this.debug.state;
  }

  /** Called with the session on every state or counter change worth redrawing. */
  subscribe(fn) {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  /** Called with ({text, color}) for each word piece Moshi says. */
  onText(fn) {
    this.textListeners.add(fn);
    return () => this.textListeners.delete(fn);
  }

  get active() {
    return [State.CONNECTING, State.WAITING, State.CONNECTED].includes(this.state);
  }

  /**
   * Starts a conversation. Must be called from a user gesture: the audio side creates its AudioContext
   * before anything is awaited.
   * @param {Record<string, number>} params query parameter values, seeds already resolved
   */
  async start(params) {
    if (this.active) throw new Error("a conversation is already running");
    const counters = newDebugCounters();
    Object.assign(this.debug, counters); // keep the same object: window.moshiDebug stays valid
    this.debug.params = { ...params };
    this.debug.startedAt = this.now();
    this.ogg = new OggPageAssembler();
    this.audio.onStats = (stats) => this.mergeAudioStats(stats);
    this.setState(State.CONNECTING, "preparing audio…");
    try {
      this.debug.audio.sampleRate = await this.audio.prepare();
    } catch (err) {
      if (this.state === State.CONNECTING) this.fail(err.message || String(err)); // else: stopped meanwhile
      await this.audio.close();
      return;
    }
    if (this.state !== State.CONNECTING) return; // stopped while preparing
    let socket;
    try {
      const url = buildChatUrl(this.pageHref, params, this.token);
      this.debug.url = this.token ? url.replace(/([?&]token=)[^&]*/, "$1…") : url;
      this.setState(State.CONNECTING, "connecting to the server…");
      socket = this.createSocket(url);
    } catch (err) {
      this.fail(`could not open the websocket: ${err.message}`);
      await this.audio.close();
      return;
    }
    socket.binaryType = "arraybuffer";
    this.socket = socket;
    socket.onopen = () => {
      if (this.socket !== socket) return;
      this.setState(State.WAITING, "connected, waiting for a free slot…");
    };
    socket.onmessage = (event) => {
      if (this.socket !== socket) return;
      this.handleFrame(event.data);
    };
    socket.onerror = () => {
      // The close event that follows carries the details.
      if (this.socket === socket) this.log.warn("websocket error");
    };
    socket.onclose = (event) => {
      if (this.socket !== socket) return;
      this.handleClose(event);
    };
  }

  /** Ends the conversation from the page (Stop button). */
  async stop(reason = "stopped") {
    const socket = this.socket;
    this.socket = null;
    this.stopWatchdog();
    if (socket && socket.readyState <= 1) socket.close(1000, reason);
    if (this.active) this.setState(State.CLOSED, reason);
    await this.audio.close();
  }

  handleFrame(data) {
    this.lastMessageAt = this.now();
    let msg;
    try {
      if (typeof data === "string") throw new ProtocolError("text frame received; the protocol uses binary frames only");
      msg = decodeMessage(data);
    } catch (err) {
      this.debug.protocolErrors += 1;
      this.failAndClose(`protocol error: ${err.message}`, 4000);
      return;
    }
    const counter = this.debug.received[msg.name];
    counter.messages += 1;
    counter.bytes += msg.size;
    switch (msg.kind) {
      case Kind.HANDSHAKE:
        this.onHandshake(msg);
        break;
      case Kind.AUDIO:
        this.onAudio(msg.payload);
        break;
      case Kind.TEXT:
      case Kind.COLORED_TEXT:
        this.debug.transcript += msg.text;
        for (const fn of this.textListeners) fn({ text: msg.text, color: msg.color ?? null });
        break;
      case Kind.CONTROL:
        this.debug.lastControl = msg.action;
        break;
      case Kind.METADATA:
        this.debug.metadata = msg.data;
        if (msg.data && typeof msg.data.stream === "object" && msg.data.stream) this.onStreamStatus(msg.data.stream);
        break;
      case Kind.ERROR:
        this.onServerError(msg.text);
        break;
      default:
        break; // ping
    }
    this.notify();
  }

  async onHandshake(msg) {
    if (this.debug.handshake) return; // a repeated handshake changes nothing
    this.debug.handshake = {
      protocolVersion: msg.protocolVersion,
      modelVersion: msg.modelVersion,
      afterMs: this.now() - this.debug.startedAt,
    };
    this.debug.connectedAt = this.now();
    this.setState(State.CONNECTED, "opening the microphone…");
    this.startWatchdog();
    const socket = this.socket;
    try {
      await this.audio.openMic((page) => this.sendAudioPage(page));
    } catch (err) {
      if (this.socket !== socket) return;
      this.failAndClose(err.message || String(err), 1000);
      return;
    }
    if (this.socket === socket && this.state === State.CONNECTED) this.setState(State.CONNECTED, liveDetail(this.debug));
  }

  /** The server fell behind (it drops our audio to keep up) or caught up again. */
  onStreamStatus(stream) {
    const num = (v) => (Number.isFinite(v) && v >= 0 ? v : 0);
    this.debug.stream = {
      state: stream.state === "behind" ? "behind" : "live",
      missedAudioS: num(stream.missed_audio_s),
      latencyS: num(stream.latency_s),
    };
    if (this.state === State.CONNECTED && this.debug.handshake) this.setState(State.CONNECTED, liveDetail(this.debug));
  }

  onAudio(payload) {
    const pages = this.ogg.push(payload);
    this.debug.ogg.pages = this.ogg.pages;
    this.debug.ogg.crcErrors = this.ogg.crcErrors;
    this.debug.ogg.skippedBytes = this.ogg.skippedBytes;
    if (pages.length > 0) this.audio.decode(pages);
  }

  onServerError(text) {
    // Both end the conversation: the page closes its side instead of waiting for the server to.
    this.debug.lastError = text;
    const socket = this.socket;
    this.socket = null;
    this.stopWatchdog();
    if (isBusyError(text)) {
      // The server's own words usually say "busy" already; repeating a prefix reads as a stutter.
      this.setState(State.BUSY, /\bbusy\b/i.test(text) ? text : `server busy: ${text}`);
    } else {
      this.setState(State.ERROR, `server error: ${text}`);
    }
    if (socket && socket.readyState <= 1) socket.close(1000, "server error");
    Promise.resolve(this.audio.close()).catch((err) => this.log.warn("audio close failed", err));
  }

  sendAudioPage(page) {
    const socket = this.socket;
    if (!socket || socket.readyState !== 1 || this.state !== State.CONNECTED) return;
    if (socket.bufferedAmount > MAX_SEND_BACKLOG_BYTES) {
      this.debug.sent.droppedAudioPages += 1;
      return;
    }
    const frame = encodeMessage(Kind.AUDIO, page);
    socket.send(frame);
    this.debug.sent.audio.messages += 1;
    this.debug.sent.audio.bytes += frame.length;
  }

  handleClose(event) {
    this.socket = null;
    this.stopWatchdog();
    const code = event?.code ?? 1006;
    const why = event?.reason ? `: ${event.reason}` : "";
    if (this.state === State.CONNECTING) {
      this.fail(`could not connect to the server (code ${code}${why}). Is \`openmoshi serve\` running?`);
    } else {
      const who = this.state === State.WAITING ? "before a slot was free" : "by the server";
      this.setState(State.CLOSED, `connection closed ${who} (code ${code}${why})`);
    }
    Promise.resolve(this.audio.close()).catch((err) => this.log.warn("audio close failed", err));
  }

  failAndClose(message, code) {
    const socket = this.socket;
    this.socket = null;
    this.stopWatchdog();
    this.fail(message);
    if (socket && socket.readyState <= 1) socket.close(code, message.slice(0, 120));
    Promise.resolve(this.audio.close()).catch((err) => this.log.warn("audio close failed", err));
  }

  fail(message) {
    this.debug.lastError = message;
    this.setState(State.ERROR, message);
  }

  startWatchdog() {
    this.stopWatchdog();
    this.lastMessageAt = this.now();
    this.watchdog = this.timers.setInterval(() => {
      if (this.now() - this.lastMessageAt > SILENCE_TIMEOUT_MS) {
        this.failAndClose(`no data from the server for ${SILENCE_TIMEOUT_MS / 1000} s`, 1000);
      }
    }, 1000);
  }

  stopWatchdog() {
    if (this.watchdog !== null) this.timers.clearInterval(this.watchdog);
    this.watchdog = null;
  }

  mergeAudioStats(stats) {
    Object.assign(this.debug.audio, stats);
    if (this.debug.audio.sampleRate) {
      this.debug.audio.secondsPlayed = this.debug.audio.samplesPlayed / this.debug.audio.sampleRate;
    }
    this.notify();
  }

  setState(state, detail = "") {
    const wasActive = this.active;
    this.debug.state = state;
    if (wasActive && !this.active) this.debug.endedAt = this.now();
    this.debug.detail = detail;
    this.notify();
  }

  notify() {
    for (const fn of this.listeners) fn(this);
  }
}
