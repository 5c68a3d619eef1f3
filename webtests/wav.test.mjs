import { test } from "node:test";
import assert from "node:assert/strict";
import { ConversationTape, encodeWav, floatToInt16 } from "../openmoshi/server/static/js/wav.js";

const ascii = (b, from, n) => String.fromCharCode(...b.subarray(from, from + n));

test("float to 16-bit: full scale, clipping, rounding", () => {
  assert.equal(floatToInt16(1), 32767);
  assert.equal(floatToInt16(-1), -32768);
  assert.equal(floatToInt16(2.5), 32767);
  assert.equal(floatToInt16(-7), -32768);
  assert.equal(floatToInt16(0), 0);
  assert.equal(floatToInt16(0.5), 16384);
});

test("WAV header and interleaved data", () => {
  const wav = encodeWav([Int16Array.from([1, -1, 2]), Int16Array.from([-2])], { channels: 2, sampleRate: 24000 });
  const v = new DataView(wav.buffer);
  assert.equal(wav.length, 44 + 8);
  assert.equal(ascii(wav, 0, 4), "RIFF");
  assert.equal(v.getUint32(4, true), 36 + 8);
  assert.equal(ascii(wav, 8, 8), "WAVEfmt ");
  assert.equal(v.getUint16(20, true), 1);
  assert.equal(v.getUint16(22, true), 2);
  assert.equal(v.getUint32(24, true), 24000);
  assert.equal(v.getUint32(28, true), 96000);
  assert.equal(v.getUint16(32, true), 4);
  assert.equal(v.getUint16(34, true), 16);
  assert.equal(ascii(wav, 36, 4), "data");
  assert.equal(v.getUint32(40, true), 8);
  assert.deepEqual([0, 1, 2, 3].map((i) => v.getInt16(44 + 2 * i, true)), [1, -1, 2, -2]);
});

test("tape: left is the microphone, right is Moshi, sample-aligned; capped at maxSeconds", () => {
  const tape = new ConversationTape({ sampleRate: 10, maxSeconds: 1 });
  tape.append(Float32Array.from([0.5, 0, 0, 0]), Float32Array.from([0, -0.5, 0, 1]));
  tape.append(new Float32Array(8).fill(0.25), new Float32Array(8));
  assert.equal(tape.frames, 10);
  assert.equal(tape.droppedFrames, 2);
  assert.equal(tape.seconds, 1);
  const wav = tape.toWav();
  const v = new DataView(wav.buffer);
  assert.equal(v.getUint16(22, true), 2);
  assert.equal(v.getUint32(40, true), 10 * 4);
  assert.deepEqual([0, 1, 2, 3, 6, 7].map((i) => v.getInt16(44 + 2 * i, true)), [16384, 0, 0, -16384, 0, 32767]);
  assert.equal(v.getInt16(44 + 2 * 8, true), 8192); // first sample of the second block, left
  assert.throws(() => tape.append(new Float32Array(2), new Float32Array(3)), /lengths differ/);
  tape.clear();
  assert.equal(tape.toWav().length, 44);
});
