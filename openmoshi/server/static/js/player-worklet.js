// AudioWorklet processor "moshi-player": plays Moshi's decoded audio through a jitter buffer, and, while
// recording, hands back aligned blocks of (microphone input, played output) for the conversation WAV.
//
// Messages in (port):  {type: "audio", samples: Float32Array}  {type: "record", on: boolean}  {type: "reset"}
// Messages out (port): {type: "stats", ...JitterBuffer.stats(), micLevel, moshiLevel}
//                      {type: "tape", mic: Float32Array, moshi: Float32Array}

import { JitterBuffer } from "./jitter.js";

const STATS_EVERY_S = 0.1;
const TAPE_BLOCK_S = 0.25;

class MoshiPlayer extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = options.processorOptions || {};
    this.jitter = new JitterBuffer({ sampleRate, startMs: opts.startMs, maxMs: opts.maxMs });
    this.recording = false;
    this.tapeSize = Math.round(TAPE_BLOCK_S * sampleRate);
    this.newTape();
    this.statsEvery = Math.round(STATS_EVERY_S * sampleRate);
    this.sinceStats = 0;
    this.micEnergy = 0;
    this.moshiEnergy = 0;
    this.port.onmessage = ({ data }) => {
      if (data.type === "audio") this.jitter.push(data.samples);
      else if (data.type === "record") {
        if (!data.on) this.flushTape();
        this.recording = data.on;
      } else if (data.type === "reset") this.jitter.reset();
    };
  }

  newTape() {
    this.tapeMic = new Float32Array(this.tapeSize);
    this.tapeMoshi = new Float32Array(this.tapeSize);
    this.tapeFill = 0;
  }

  flushTape() {
    if (this.tapeFill === 0) return;
    const mic = this.tapeMic.slice(0, this.tapeFill);
    const moshi = this.tapeMoshi.slice(0, this.tapeFill);
    this.port.postMessage({ type: "tape", mic, moshi }, [mic.buffer, moshi.buffer]);
    this.newTape();
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    this.jitter.pull(out);
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);
    const mic = inputs[0] && inputs[0].length > 0 ? inputs[0][0] : null;

    for (let i = 0; i < out.length; i++) this.moshiEnergy += out[i] * out[i];
    if (mic) for (let i = 0; i < mic.length; i++) this.micEnergy += mic[i] * mic[i];

    if (this.recording) {
      let done = 0;
      while (done < out.length) {
        const n = Math.min(out.length - done, this.tapeSize - this.tapeFill);
        this.tapeMoshi.set(out.subarray(done, done + n), this.tapeFill);
        if (mic) this.tapeMic.set(mic.subarray(done, done + n), this.tapeFill);
        this.tapeFill += n;
        done += n;
        if (this.tapeFill === this.tapeSize) this.flushTape();
      }
    }

    this.sinceStats += out.length;
    if (this.sinceStats >= this.statsEvery) {
      this.port.postMessage({
        type: "stats",
        ...this.jitter.stats(),
        micLevel: Math.sqrt(this.micEnergy / this.sinceStats),
        moshiLevel: Math.sqrt(this.moshiEnergy / this.sinceStats),
      });
      this.sinceStats = 0;
      this.micEnergy = 0;
      this.moshiEnergy = 0;
    }
    return true;
  }
}

registerProcessor("moshi-player", MoshiPlayer);
