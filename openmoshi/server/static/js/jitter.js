// Jitter buffer for Moshi's audio: pure logic, used inside the playback AudioWorklet and tested in node.
//
// Moshi's server sends audio at real-time pace in bursts (one 80 ms Mimi frame at a time), so the player
// holds back a little audio before it starts, and when the network catches up after a stall it throws
// the oldest audio away rather than staying late for the rest of the conversation.
//
//   buffering --(buffered >= startSamples)--> playing --(empty)--> buffering (one underrun counted)
//   while playing or buffering: buffered > maxSamples  ==>  drop the oldest down to startSamples

export const DEFAULT_START_MS = 90;
export const DEFAULT_MAX_MS = 250;

export class JitterBuffer {
  /**
   * @param {{sampleRate: number, startMs?: number, maxMs?: number}} options
   */
  constructor({ sampleRate, startMs = DEFAULT_START_MS, maxMs = DEFAULT_MAX_MS }) {
    if (!(sampleRate > 0)) throw new Error(`sampleRate must be positive, got ${sampleRate}`);
    if (!(maxMs > startMs)) throw new Error(`maxMs (${maxMs}) must exceed startMs (${startMs})`);
    this.sampleRate = sampleRate;
    this.startSamples = Math.round((startMs * sampleRate) / 1000);
    this.maxSamples = Math.round((maxMs * sampleRate) / 1000);
    this.reset();
  }

  reset() {
    this.chunks = [];
    this.offset = 0; // read position inside chunks[0]
    this.buffered = 0;
    this.playing = false;
    this.samplesPushed = 0;
    this.samplesPlayed = 0;
    this.samplesDropped = 0;
    this.underruns = 0;
    this.drops = 0;
  }

  /** @param {Float32Array} samples mono audio at sampleRate; kept by reference */
  push(samples) {
    if (samples.length === 0) return;
    this.chunks.push(samples);
    this.buffered += samples.length;
    this.samplesPushed += samples.length;
    if (this.buffered > this.maxSamples) this.dropOldest(this.buffered - this.startSamples);
    if (!this.playing && this.buffered >= this.startSamples) this.playing = true;
  }

  /**
   * Fills out with the next samples; silence where there is nothing to play.
   * @param {Float32Array} out
   * @returns {number} how many real (not silence) samples were written
   */
  pull(out) {
    if (!this.playing) {
      out.fill(0);
      return 0;
    }
    let written = 0;
    while (written < out.length && this.chunks.length > 0) {
      const first = this.chunks[0];
      const n = Math.min(out.length - written, first.length - this.offset);
      out.set(first.subarray(this.offset, this.offset + n), written);
      written += n;
      this.offset += n;
      if (this.offset === first.length) {
        this.chunks.shift();
        this.offset = 0;
      }
    }
    this.buffered -= written;
    this.samplesPlayed += written;
    if (written < out.length) {
      out.fill(0, written);
      this.playing = false;
      this.underruns += 1;
    }
    return written;
  }

  dropOldest(count) {
    let left = count;
    while (left > 0 && this.chunks.length > 0) {
      const first = this.chunks[0];
      const n = Math.min(left, first.length - this.offset);
      this.offset += n;
      left -= n;
      if (this.offset === first.length) {
        this.chunks.shift();
        this.offset = 0;
      }
    }
    const dropped = count - left;
    this.buffered -= dropped;
    this.samplesDropped += dropped;
    this.drops += 1;
  }

  /** Buffered audio in milliseconds. */
  get bufferedMs() {
    return (this.buffered * 1000) / this.sampleRate;
  }

  stats() {
    return {
      playing: this.playing,
      buffered: this.buffered,
      bufferedMs: this.bufferedMs,
      samplesPushed: this.samplesPushed,
      samplesPlayed: this.samplesPlayed,
      samplesDropped: this.samplesDropped,
      drops: this.drops,
      underruns: this.underruns,
    };
  }
}
