import { test } from "node:test";
import assert from "node:assert/strict";
import { bytesEqual, fixture, randomChunks, rng, splitPagesByHeader } from "./helpers.mjs";
import {
  FLAG_CONTINUED, FLAG_FIRST, OggPacketReader, OggPageAssembler, concatBytes, lacingFor, oggCrc, opusHead,
  opusPacketSamples48k, opusTags, pageCrc, parseOpusHead, parsePage, writePage,
} from "../openmoshi/server/static/js/ogg.js";

const SPHN = fixture("sine440_24k_sphn.opus");
const SPHN_PAGES = splitPagesByHeader(SPHN);

test("CRC matches Ogg's check value and zero input", () => {
  // Ogg's CRC (poly 0x04c11db7, init 0, no reflection, no final xor) of "123456789".
  assert.equal(oggCrc(new TextEncoder().encode("123456789")), 0x89a1897f);
  assert.equal(oggCrc(new TextEncoder().encode("OggS")), 0x5fb0a94f);
  assert.equal(oggCrc(new Uint8Array(0)), 0);
});

test("fixture from sphn/libogg: every page's CRC verifies", () => {
  assert.equal(SPHN_PAGES.length, 14);
  for (const page of SPHN_PAGES) {
    const parsed = parsePage(page);
    assert.equal(parsed.crcOk, true);
    assert.equal(pageCrc(page), parsed.crc);
    assert.equal(parsed.size, page.length);
  }
  const head = parsePage(SPHN_PAGES[0]);
  assert.equal(head.flags, FLAG_FIRST);
  assert.equal(head.sequence, 0);
  assert.equal(parsePage(SPHN_PAGES[13]).granule, 23040);
});

test("a flipped byte breaks the CRC", () => {
  const page = SPHN_PAGES[5].slice();
  page[page.length - 3] ^= 0x01;
  assert.equal(parsePage(page).crcOk, false);
});

test("writer reproduces sphn's pages byte for byte", () => {
  const reader = new OggPacketReader();
  for (const page of SPHN_PAGES) {
    const { packets, page: p } = reader.push(page);
    const rebuilt = writePage({ packets, granule: p.granule, serial: p.serial, sequence: p.sequence, flags: p.flags });
    assert.ok(bytesEqual(rebuilt, page), `page ${p.sequence} differs`);
  }
});

test("assembler: every two-chunk split reassembles the same pages", () => {
  for (let cut = 0; cut <= SPHN.length; cut++) {
    const asm = new OggPageAssembler();
    const pages = [...asm.push(SPHN.subarray(0, cut)), ...asm.push(SPHN.subarray(cut))];
    assert.equal(pages.length, SPHN_PAGES.length, `cut at ${cut}`);
    assert.ok(pages.every((p, i) => bytesEqual(p, SPHN_PAGES[i])), `cut at ${cut}`);
    assert.equal(asm.pendingBytes, 0);
    assert.equal(asm.crcErrors, 0);
  }
});

test("assembler: random chunkings and byte-by-byte feeding", () => {
  for (let seed = 1; seed <= 50; seed++) {
    const asm = new OggPageAssembler();
    const pages = [];
    for (const chunk of randomChunks(SPHN, rng(seed), seed * 7)) pages.push(...asm.push(chunk));
    assert.equal(pages.length, SPHN_PAGES.length);
    assert.ok(pages.every((p, i) => bytesEqual(p, SPHN_PAGES[i])));
    assert.equal(asm.skippedBytes, 0);
  }
  const asm = new OggPageAssembler();
  let count = 0;
  for (let i = 0; i < SPHN.length; i++) count += asm.push(SPHN.subarray(i, i + 1)).length;
  assert.equal(count, 14);
  assert.equal(asm.pages, 14);
});

test("assembler: pages come out only when complete", () => {
  const asm = new OggPageAssembler();
  const first = SPHN_PAGES[0];
  assert.deepEqual(asm.push(first.subarray(0, first.length - 1)), []);
  assert.equal(asm.pendingBytes, first.length - 1);
  const out = asm.push(first.subarray(first.length - 1));
  assert.equal(out.length, 1);
  assert.ok(bytesEqual(out[0], first));
});

test("assembler: skips garbage and drops a corrupt page, then resynchronises", () => {
  const corrupt = SPHN_PAGES[3].slice();
  corrupt[40] ^= 0xff;
  const garbage = new Uint8Array([1, 2, 3, 0x4f, 0x67, 9, 9]); // includes a false "Og"
  const stream = concatBytes([garbage, ...SPHN_PAGES.slice(0, 3), corrupt, ...SPHN_PAGES.slice(4)]);
  const asm = new OggPageAssembler();
  const pages = [];
  for (const chunk of randomChunks(stream, rng(7), 64)) pages.push(...asm.push(chunk));
  assert.equal(asm.crcErrors, 1);
  assert.equal(pages.length, 13);
  assert.ok(bytesEqual(pages[3], SPHN_PAGES[4]));
  assert.equal(asm.skippedBytes, garbage.length + corrupt.length);
});

test("packets: OpusHead, OpusTags, then audio packets whose durations add up to the last granule", () => {
  const reader = new OggPacketReader();
  const packets = SPHN_PAGES.flatMap((p) => reader.push(p).packets);
  const head = parseOpusHead(packets[0]);
  assert.equal(head.channels, 1);
  assert.equal(head.version, 1);
  assert.equal(head.mappingFamily, 0);
  assert.equal(new TextDecoder().decode(packets[1].subarray(0, 8)), "OpusTags");
  const audio = packets.slice(2);
  assert.equal(audio.length, 12);
  assert.equal(audio.reduce((n, p) => n + opusPacketSamples48k(p), 0), 23040);
});

test("packets longer than 255 bytes and packets continued across pages", () => {
  assert.deepEqual(lacingFor(0), [0]);
  assert.deepEqual(lacingFor(255), [255, 0]);
  assert.deepEqual(lacingFor(600), [255, 255, 90]);
  const big = Uint8Array.from({ length: 600 }, (_, i) => i & 0xff);
  const small = new Uint8Array([7, 8, 9]);
  const page = writePage({ packets: [big, small], granule: 960, serial: 42, sequence: 2 });
  const parsed = parsePage(page);
  assert.deepEqual([...parsed.lacing], [255, 255, 90, 3]);
  assert.equal(parsed.crcOk, true);
  const reader = new OggPacketReader();
  const { packets } = reader.push(page);
  assert.equal(packets.length, 2);
  assert.ok(bytesEqual(packets[0], big));
  assert.ok(bytesEqual(packets[1], small));

  // A 300-byte packet split across two pages: lacing [255] then (continued) [45].
  const long = Uint8Array.from({ length: 300 }, (_, i) => (i * 7) & 0xff);
  const p1 = rawPage([255], long.subarray(0, 255), 0, -1, 3);
  const p2 = rawPage([45], long.subarray(255), FLAG_CONTINUED, 1920, 4);
  const r2 = new OggPacketReader();
  assert.equal(r2.push(p1).packets.length, 0);
  const out = r2.push(p2).packets;
  assert.equal(out.length, 1);
  assert.ok(bytesEqual(out[0], long));
  assert.equal(parsePage(p1).granule, -1);
});

test("writer checks segment count and header packets have the RFC 7845 layout", () => {
  const tooMany = Array.from({ length: 256 }, () => new Uint8Array(1));
  assert.throws(() => writePage({ packets: tooMany, granule: 0, serial: 1, sequence: 0 }), /too many segments/);
  const head = opusHead({ channels: 1, preSkip: 312, inputSampleRate: 24000 });
  assert.equal(head.length, 19);
  assert.deepEqual(parseOpusHead(head), {
    version: 1, channels: 1, preSkip: 312, inputSampleRate: 24000, outputGain: 0, mappingFamily: 0,
  });
  const tags = opusTags("x");
  assert.equal(tags.length, 8 + 4 + 1 + 4);
  assert.equal(parseOpusHead(tags), null);
});

test("Opus TOC durations", () => {
  assert.equal(opusPacketSamples48k(new Uint8Array([(31 << 3) | 0])), 960); // CELT FB 20 ms, 1 frame
  assert.equal(opusPacketSamples48k(new Uint8Array([(31 << 3) | 1])), 1920); // 2 frames
  assert.equal(opusPacketSamples48k(new Uint8Array([(1 << 3) | 0])), 960); // SILK NB 20 ms
  assert.equal(opusPacketSamples48k(new Uint8Array([(2 << 3) | 0])), 1920); // SILK NB 40 ms
  assert.equal(opusPacketSamples48k(new Uint8Array([(31 << 3) | 3, 3])), 2880); // code 3, 3 frames
  assert.equal(opusPacketSamples48k(new Uint8Array(0)), 0);
});

/** A page built by hand (so that continued packets can be expressed). */
function rawPage(lacing, body, flags, granule, sequence) {
  const page = new Uint8Array(27 + lacing.length + body.length);
  const view = new DataView(page.buffer);
  page.set([0x4f, 0x67, 0x67, 0x53], 0);
  page[5] = flags;
  if (granule < 0) {
    view.setUint32(6, 0xffffffff, true);
    view.setUint32(10, 0xffffffff, true);
  } else {
    view.setUint32(6, granule, true);
  }
  view.setUint32(14, 42, true);
  view.setUint32(18, sequence, true);
  page[26] = lacing.length;
  page.set(lacing, 27);
  page.set(body, 27 + lacing.length);
  view.setUint32(22, pageCrc(page), true);
  return page;
}
