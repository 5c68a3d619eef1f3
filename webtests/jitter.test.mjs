import { test } from "node:test";
import assert from "node:assert/strict";
import { JitterBuffer } from "../openmoshi/server/static/js/jitter.js";

const SR = 48000;
const ms = (x) => Math.round((x * SR) / 1000);
/** A chunk whose samples count up from `from`, so the order of played samples can be checked. */
const ramp = (from, n) => Float32Array.from({ length: n }, (_, i) => from + i);

test("stays silent until the start threshold, then plays from the first sample", () => {
  const jb = new JitterBuffer({ sampleRate: SR, startMs: 90, maxMs: 250 });
  assert.equal(jb.startSamples, 4320);
  const out = new Float32Array(128);
  jb.push(ramp(0, ms(80)));
  assert.equal(jb.pull(out), 0);
  assert.ok(out.every((x) => x === 0));
  assert.equal(jb.buffered, ms(80)); // nothing consumed while buffering
  assert.equal(jb.playing, false);
  jb.push(ramp(ms(80), ms(10))); // exactly 90 ms
  assert.equal(jb.playing, true);
  assert.equal(jb.pull(out), 128);
  assert.deepEqual([...out.subarray(0, 4)], [0, 1, 2, 3]);
  assert.equal(jb.samplesPlayed, 128);
});

test("plays across chunk boundaries in order", () => {
  const jb = new JitterBuffer({ sampleRate: SR, startMs: 1, maxMs: 250 });
  jb.push(ramp(0, 50));
  jb.push(ramp(50, 30));
  jb.push(ramp(80, 100));
  const out = new Float32Array(128);
  assert.equal(jb.pull(out), 128);
  assert.deepEqual([...out], [...ramp(0, 128)]);
  assert.equal(jb.buffered, 52);
});

test("an underrun pads with silence and re-buffers before playing again", () => {
  const jb = new JitterBuffer({ sampleRate: SR, startMs: 90, maxMs: 250 });
  const out = new Float32Array(128);
  jb.push(ramp(1, ms(90) + 28)); // 4348 samples = 33 blocks of 128 + 124
  let played = 0;
  for (let i = 0; i < 33; i++) played += jb.pull(out);
  assert.equal(played, 4224);
  assert.equal(jb.pull(out), 124);
  assert.ok(out.subarray(124).every((x) => x === 0));
  assert.equal(jb.underruns, 1);
  assert.equal(jb.playing, false);
  jb.push(ramp(0, ms(50))); // below the threshold again: still silent
  assert.equal(jb.pull(out), 0);
  jb.push(ramp(0, ms(40)));
  assert.equal(jb.pull(out), 128);
});

test("far behind: drops the oldest audio down to the start level and keeps the newest", () => {
  const jb = new JitterBuffer({ sampleRate: SR, startMs: 90, maxMs: 250 });
  // 4 Mimi frames of 80 ms arrive at once (a network stall): 320 ms > 250 ms.
  for (let f = 0; f < 4; f++) jb.push(ramp(f * ms(80), ms(80)));
  assert.equal(jb.buffered, ms(90));
  assert.equal(jb.samplesDropped, ms(320) - ms(90));
  assert.equal(jb.drops, 1);
  const out = new Float32Array(128);
  jb.pull(out);
  assert.equal(out[0], ms(320) - ms(90)); // the first kept sample is the oldest of the newest 90 ms
  assert.equal(jb.bufferedMs, 90 - (128 * 1000) / SR);
});

test("at real-time pace nothing is dropped and nothing underruns", () => {
  const jb = new JitterBuffer({ sampleRate: SR, startMs: 90, maxMs: 250 });
  const out = new Float32Array(128);
  const frame = ms(80); // 3840 samples = 30 render quanta
  let maxBuffered = 0;
  for (let f = 0; f < 50; f++) {
    jb.push(ramp(0, frame));
    maxBuffered = Math.max(maxBuffered, jb.buffered);
    for (let q = 0; q < 30; q++) jb.pull(out);
  }
  assert.equal(jb.samplesDropped, 0);
  assert.equal(jb.underruns, 0);
  // The first frame alone (80 ms) is under the 90 ms threshold, so playback starts with the second one
  // and the buffer then swings between 80 and 160 ms.
  assert.equal(maxBuffered, 2 * frame);
  assert.equal(jb.buffered, frame);
  assert.equal(jb.samplesPlayed, 49 * frame);
});

test("rejects nonsense thresholds", () => {
  assert.throws(() => new JitterBuffer({ sampleRate: SR, startMs: 300, maxMs: 250 }), /maxMs/);
  assert.throws(() => new JitterBuffer({ sampleRate: 0 }), /sampleRate/);
});
