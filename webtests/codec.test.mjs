// Runs the vendored opus-recorder wasm encoder and decoder in node, with the page's own Ogg code in
// between, to check what the browser will send and how it will decode what Moshi sends.
import { test, before } from "node:test";
import assert from "node:assert/strict";
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";
import { fixture, randomChunks, rng } from "./helpers.mjs";
import {
  FLAG_FIRST, OggPacketReader, OggPageAssembler, opusPacketSamples48k, parseOpusHead, parsePage,
} from "../openmoshi/server/static/js/ogg.js";

const require = createRequire(import.meta.url);
const VENDOR = fileURLToPath(new URL("../openmoshi/server/static/vendor/opus-recorder/", import.meta.url));

let encoderLib;
let decoderLib;
const decoderOutput = [];

async function until(cond, what) {
  for (let i = 0; i < 500; i++) {
    if (cond()) return;
    await new Promise((r) => setTimeout(r, 10));
  }
  throw new Error(`timed out waiting for ${what}`);
}

before(async () => {
  encoderLib = require(`${VENDOR}encoderWorker.min.js`);
  // The decoder's loader prefers fetch() when it exists, which cannot read a file path in node; without
  // it, it reads decoderWorker.min.wasm next to the script.
  const savedFetch = globalThis.fetch;
  globalThis.fetch = undefined;
  try {
    decoderLib = require(`${VENDOR}decoderWorker.min.js`);
  } finally {
    globalThis.fetch = savedFetch;
  }
  // The decoder posts its output to the worker's global scope.
  globalThis.postMessage = (msg) => {
    if (msg) decoderOutput.push(msg[0].slice());
  };
  await until(() => encoderLib.Module.calledRun, "the encoder wasm");
  await decoderLib.mainReady;
});

function sine(freq, seconds, sampleRate, amplitude = 0.3) {
  return Float32Array.from({ length: Math.round(seconds * sampleRate) }, (_, i) =>
    amplitude * Math.sin((2 * Math.PI * freq * i) / sampleRate));
}

/** Encodes like the page does: 20 ms frames at 24 kHz, 2 frames per page, VOIP, complexity 0. */
function encodeLikeThePage(pcm, inputRate) {
  const enc = new encoderLib.OggOpusEncoder({
    encoderSampleRate: 24000, encoderFrameSize: 20, maxFramesPerPage: 2, numberOfChannels: 1,
    encoderApplication: 2049, encoderComplexity: 0, resampleQuality: 3, originalSampleRate: inputRate,
  }, encoderLib.Module);
  const pages = [enc.generateIdPage().page, enc.generateCommentPage().page];
  const block = 128; // what an AudioWorklet hands over per render quantum
  for (let i = 0; i + block <= pcm.length; i += block) {
    for (const p of enc.encode([pcm.subarray(i, i + block)])) pages.push(p.page);
  }
  enc.destroy();
  return pages;
}

function decodeAll(pages, outputRate) {
  decoderOutput.length = 0;
  const dec = new decoderLib.OggOpusDecoder({
    decoderSampleRate: 24000, outputBufferSampleRate: outputRate,
    bufferLength: Math.round(outputRate * 0.02), resampleQuality: 3,
  }, decoderLib);
  for (const page of pages) dec.decode(page);
  let n = 0;
  for (const c of decoderOutput) n += c.length;
  const out = new Float32Array(n);
  let o = 0;
  for (const c of decoderOutput) {
    out.set(c, o);
    o += c.length;
  }
  return out;
}

function rms(x) {
  let s = 0;
  for (const v of x) s += v * v;
  return Math.sqrt(s / x.length);
}

/** Frequency from the count of rising zero crossings. */
function frequency(x, sampleRate) {
  let crossings = 0;
  for (let i = 1; i < x.length; i++) if (x[i - 1] < 0 && x[i] >= 0) crossings += 1;
  return (crossings * sampleRate) / x.length;
}

test("encoder output: Opus headers, then pages of two 20 ms packets, valid CRCs", () => {
  const pages = encodeLikeThePage(sine(440, 1, 48000), 48000);
  const reader = new OggPacketReader();
  const parsed = pages.map((p) => reader.push(p));
  assert.equal(parsed[0].page.flags, FLAG_FIRST);
  const head = parseOpusHead(parsed[0].packets[0]);
  assert.equal(head.channels, 1);
  assert.equal(new TextDecoder().decode(parsed[1].packets[0].subarray(0, 8)), "OpusTags");
  const data = parsed.slice(2);
  assert.equal(data.length, 25); // 1 s = 50 frames of 20 ms = 25 pages
  data.forEach(({ packets, page }, i) => {
    assert.equal(packets.length, 2);
    assert.deepEqual(packets.map(opusPacketSamples48k), [960, 960]);
    assert.equal(page.granule, (i + 1) * 1920);
    assert.equal(page.sequence, i + 2);
  });
  assert.ok(parsed.every(({ page }) => page.crcOk), "the encoder's CRCs agree with ours");
  assert.equal(new Set(parsed.map(({ page }) => page.serial)).size, 1);
});

test("round trip through split websocket messages: the decoder gets whole pages and recovers the tone", () => {
  const pages = encodeLikeThePage(sine(440, 1, 48000), 48000);
  const stream = new Uint8Array(pages.reduce((n, p) => n + p.length, 0));
  let o = 0;
  for (const p of pages) {
    stream.set(p, o);
    o += p.length;
  }
  const asm = new OggPageAssembler();
  const whole = [];
  for (const chunk of randomChunks(stream, rng(11), 97)) whole.push(...asm.push(chunk));
  assert.equal(whole.length, pages.length);
  const pcm = decodeAll(whole, 48000);
  assert.equal(pcm.length, 48000); // 50 frames x 20 ms, resampled back to 48 kHz
  const steady = pcm.subarray(4800); // skip the codec's start-up
  assert.ok(Math.abs(rms(steady) - 0.3 / Math.SQRT2) < 0.03, `rms ${rms(steady)}`);
  assert.ok(Math.abs(frequency(steady, 48000) - 440) < 5, `frequency ${frequency(steady, 48000)}`);
});

test("decodes the sphn-written stream (what the server sends) at 44.1 kHz output", () => {
  const ogg = fixture("sine440_24k_sphn.opus");
  const asm = new OggPageAssembler();
  const pages = asm.push(ogg);
  const lastGranule = parsePage(pages.at(-1)).granule; // 48 kHz units
  const pcm = decodeAll(pages, 44100);
  const expected = Math.round((lastGranule * 44100) / 48000);
  // The decoder hands out whole 20 ms buffers, so up to one buffer of the end stays inside it.
  assert.ok(pcm.length <= expected && pcm.length > expected - 882, `${pcm.length} vs ${expected}`);
  const steady = pcm.subarray(8820);
  assert.ok(Math.abs(rms(steady) - 0.3 / Math.SQRT2) < 0.03, `rms ${rms(steady)}`);
  assert.ok(Math.abs(frequency(steady, 44100) - 440) < 10, `frequency ${frequency(steady, 44100)}`);
});
