// Browser audio for a session: microphone -> Opus/Ogg encoder (vendored wasm, run as an AudioWorklet),
// Moshi's Ogg pages -> decoder (vendored wasm, in a Worker) -> "moshi-player" worklet -> speakers,
// and the conversation tape. Implements the audio interface that MoshiSession expects.

import { ConversationTape } from "./wav.js";
import { concatBytes } from "./ogg.js";

const VENDOR = new URL("../vendor/opus-recorder/", import.meta.url);
const ENCODER_URL = new URL("encoderWorker.min.js", VENDOR);
const DECODER_URL = new URL("decoderWorker.min.js", VENDOR);
const PLAYER_URL = new URL("./player-worklet.js", import.meta.url);

/** Moshi's audio: mono, 24 kHz, Opus frames of 20 ms, 2 frames per Ogg page. */
export const MOSHI_SAMPLE_RATE = 24000;
export const FRAME_MS = 20;
export const FRAMES_PER_PAGE = 2;

export const MIC_CONSTRAINTS = Object.freeze({
  audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
});

/** A problem with the microphone or audio support, with a message meant for the user. */
export class AudioSetupError extends Error {
  constructor(message) {
    super(message);
    this.name = "AudioSetupError";
  }
}

/**
 * Why the microphone cannot be used at all on this page, or null when it can.
 * @param {{isSecureContext?: boolean, navigator?: any, location?: any}} env usually window
 */
export function microphoneUnavailableReason(env) {
  const host = env.location ? env.location.host : "this host";
  if (!env.isSecureContext || !env.navigator?.mediaDevices?.getUserMedia) {
    return (
      `The microphone is not available on this page (${host}). Browsers only allow it on secure ` +
      "origins: open the page as http://localhost:<port> (for a remote server, forward the port with " +
      "`ssh -L 8998:localhost:8998 <server>`) or serve it over HTTPS."
    );
  }
  if (typeof AudioWorkletNode === "undefined" || typeof WebAssembly === "undefined") {
    return "This browser lacks AudioWorklet or WebAssembly support; use a recent Chrome, Edge, Firefox or Safari.";
  }
  return null;
}

/** A user-facing message for a getUserMedia failure. */
export function describeMicError(err) {
  switch (err && err.name) {
    case "NotAllowedError":
    case "SecurityError":
      return "Microphone access was denied. Allow the microphone for this site (the icon in the address bar) and press Start again.";
    case "NotFoundError":
    case "OverconstrainedError":
      return "No microphone was found. Plug one in (or pick one in the system settings) and press Start again.";
    case "NotReadableError":
    case "AbortError":
      return "The microphone is in use by another application or could not be started.";
    default:
      return `Could not open the microphone: ${err && err.message ? err.message : err}`;
  }
}

export class BrowserAudio {
  /**
   * @param {{startMs?: number, maxMs?: number, env?: any}} [options] jitter buffer thresholds
   */
  constructor({ startMs = 90, maxMs = 250, env = globalThis } = {}) {
    this.startMs = startMs;
    this.maxMs = maxMs;
    this.env = env;
    this.onStats = null;
    this.tape = null;
    this.ctx = null;
    this.generation = 0;
  }

  /**
   * Creates the AudioContext (synchronously, so call from a user gesture), loads the worklets and
   * the decoder. Resolves to the context's sample rate.
   */
  async prepare() {
    const reason = microphoneUnavailableReason(this.env);
    if (reason) throw new AudioSetupError(reason);
    const generation = ++this.generation;
    const ctx = new AudioContext({ latencyHint: "interactive" });
    this.ctx = ctx;
    const resumed = ctx.resume();
    this.stats = { samplesDecoded: 0, recordedSeconds: 0, sampleRate: ctx.sampleRate };
    await resumed;
    await ctx.audioWorklet.addModule(PLAYER_URL);
    await ctx.audioWorklet.addModule(ENCODER_URL);
    if (generation !== this.generation) throw new AudioSetupError("stopped");

    const tape = new ConversationTape({ sampleRate: ctx.sampleRate });
    this.tape = tape;
    this.player = new AudioWorkletNode(ctx, "moshi-player", {
      numberOfInputs: 1,
      numberOfOutputs: 1,
      outputChannelCount: [1],
      processorOptions: { startMs: this.startMs, maxMs: this.maxMs },
    });
    this.player.port.onmessage = ({ data }) => this.onPlayerMessage(data, tape);
    this.player.connect(ctx.destination);

    this.decoder = new Worker(DECODER_URL);
    this.decoder.onmessage = ({ data }) => this.onDecoded(data);
    this.decoder.onerror = (event) => console.error("opus decoder failed", event.message);
    this.decoder.postMessage({
      command: "init",
      decoderSampleRate: MOSHI_SAMPLE_RATE,
      outputBufferSampleRate: ctx.sampleRate,
      // Hand decoded audio over every 20 ms so the jitter buffer, not the decoder, sets the latency.
      bufferLength: Math.round((ctx.sampleRate * FRAME_MS) / 1000),
      resampleQuality: 3,
    });
    return ctx.sampleRate;
  }

  /** Opens the microphone and starts encoding; onPage gets each Ogg page (the first two are headers). */
  async openMic(onPage) {
    const ctx = this.ctx;
    const generation = this.generation;
    let stream;
    try {
      stream = await this.env.navigator.mediaDevices.getUserMedia(MIC_CONSTRAINTS);
    } catch (err) {
      throw new AudioSetupError(describeMicError(err));
    }
    if (generation !== this.generation) {
      for (const t of stream.getTracks()) t.stop();
      return;
    }
    this.stream = stream;
    this.source = ctx.createMediaStreamSource(stream);
    const encoder = new AudioWorkletNode(ctx, "encoder-worklet", { numberOfOutputs: 0 });
    this.encoder = encoder;
    const ready = new Promise((resolve) => {
      encoder.port.onmessage = ({ data }) => {
        if (data.message === "ready") resolve();
        else if (data.message === "page") onPage(data.page);
      };
    });
    encoder.port.postMessage({
      command: "init",
      encoderSampleRate: MOSHI_SAMPLE_RATE,
      encoderFrameSize: FRAME_MS,
      maxFramesPerPage: FRAMES_PER_PAGE,
      numberOfChannels: 1,
      encoderApplication: 2049, // OPUS_APPLICATION_VOIP
      encoderComplexity: 0,
      resampleQuality: 3,
      originalSampleRate: ctx.sampleRate,
    });
    await ready;
    if (generation !== this.generation) return;
    encoder.port.postMessage({ command: "getHeaderPages" });
    this.source.connect(encoder);
    this.source.connect(this.player); // the player taps the mic for the recording, it does not play it
    this.player.port.postMessage({ type: "record", on: true });
  }

  /** @param {Uint8Array[]} pages whole Ogg pages of Moshi's stream */
  decode(pages) {
    if (!this.decoder) return;
    const bytes = concatBytes(pages);
    this.decoder.postMessage({ command: "decode", pages: bytes }, [bytes.buffer]);
  }

  onDecoded(data) {
    if (!data || !data[0] || !this.player) return; // null marks the end of the stream
    const samples = data[0];
    this.stats.samplesDecoded += samples.length;
    this.player.port.postMessage({ type: "audio", samples }, [samples.buffer]);
  }

  onPlayerMessage(data, tape) {
    if (data.type === "tape") {
      tape.append(data.mic, data.moshi);
      if (tape === this.tape) this.stats.recordedSeconds = tape.seconds;
      return;
    }
    if (data.type === "stats" && this.onStats) {
      this.onStats({
        ...this.stats,
        samplesPlayed: data.samplesPlayed,
        bufferedMs: data.bufferedMs,
        samplesDropped: data.samplesDropped,
        underruns: data.underruns,
        playing: data.playing,
        micLevel: data.micLevel,
        moshiLevel: data.moshiLevel,
      });
    }
  }

  /** Stops everything; the tape is kept for download. */
  async close() {
    this.generation += 1;
    const player = this.player;
    this.player = null;
    if (player) player.port.postMessage({ type: "record", on: false });
    if (this.stream) for (const t of this.stream.getTracks()) t.stop();
    if (this.source) this.source.disconnect();
    if (this.encoder) {
      this.encoder.port.postMessage({ command: "close" });
      this.encoder.disconnect();
    }
    if (this.decoder) this.decoder.terminate();
    const ctx = this.ctx;
    this.stream = this.source = this.encoder = this.decoder = this.ctx = null;
    if (ctx) {
      // Let the player deliver the last tape block before the context goes away.
      await new Promise((resolve) => setTimeout(resolve, 50));
      if (player) player.disconnect();
      if (ctx.state !== "closed") await ctx.close();
    }
  }
}
