// Conversation recording: stereo 16-bit PCM (left = microphone, right = Moshi) written as a WAV file.
// DOM-free so that node can test it.

/** Float samples in [-1, 1] to 16-bit PCM, clipping outside that range. */
export function floatToInt16(x) {
  const v = Math.max(-1, Math.min(1, x));
  return v < 0 ? Math.round(v * 0x8000) : Math.round(v * 0x7fff);
}

/**
 * Accumulates aligned blocks of microphone and Moshi audio as interleaved 16-bit stereo.
 * Holds at most maxSeconds; later blocks are counted in droppedSamples but not kept.
 */
export class ConversationTape {
  constructor({ sampleRate, maxSeconds = 30 * 60 }) {
    this.sampleRate = sampleRate;
    this.maxFrames = Math.round(maxSeconds * sampleRate);
    this.chunks = [];
    this.frames = 0;
    this.droppedFrames = 0;
  }

  /**
   * @param {Float32Array} mic left channel
   * @param {Float32Array} moshi right channel, same length as mic
   */
  append(mic, moshi) {
    if (mic.length !== moshi.length) throw new Error(`channel lengths differ: ${mic.length} vs ${moshi.length}`);
    const room = this.maxFrames - this.frames;
    const n = Math.min(room, mic.length);
    this.droppedFrames += mic.length - n;
    if (n <= 0) return;
    const chunk = new Int16Array(2 * n);
    for (let i = 0; i < n; i++) {
      chunk[2 * i] = floatToInt16(mic[i]);
      chunk[2 * i + 1] = floatToInt16(moshi[i]);
    }
    this.chunks.push(chunk);
    this.frames += n;
  }

  get seconds() {
    return this.frames / this.sampleRate;
  }

  clear() {
    this.chunks = [];
    this.frames = 0;
    this.droppedFrames = 0;
  }

  /** @returns {Uint8Array} a complete WAV file */
  toWav() {
    return encodeWav(this.chunks, { channels: 2, sampleRate: this.sampleRate });
  }
}

/**
 * A RIFF/WAVE file with 16-bit PCM.
 * @param {Int16Array[]} chunks interleaved samples, in order
 * @param {{channels: number, sampleRate: number}} format
 * @returns {Uint8Array}
 */
export function encodeWav(chunks, { channels, sampleRate }) {
  let samples = 0;
  for (const c of chunks) samples += c.length;
  const dataBytes = samples * 2;
  const out = new Uint8Array(44 + dataBytes);
  const view = new DataView(out.buffer);
  const ascii = (offset, s) => {
    for (let i = 0; i < s.length; i++) out[offset + i] = s.charCodeAt(i);
  };
  ascii(0, "RIFF");
  view.setUint32(4, 36 + dataBytes, true);
  ascii(8, "WAVE");
  ascii(12, "fmt ");
  view.setUint32(16, 16, true); // fmt chunk size
  view.setUint16(20, 1, true); // PCM
  view.setUint16(22, channels, true);
  view.setUint32(24, sampleRate, true);
  view.setUint32(28, sampleRate * channels * 2, true); // byte rate
  view.setUint16(32, channels * 2, true); // block align
  view.setUint16(34, 16, true); // bits per sample
  ascii(36, "data");
  view.setUint32(40, dataBytes, true);
  let offset = 44;
  for (const c of chunks) {
    for (let i = 0; i < c.length; i++, offset += 2) view.setInt16(offset, c[i], true);
  }
  return out;
}
