// Ogg pages (RFC 3533): CRC, parsing, reassembly from arbitrary chunks, writing; Opus header packets
// (RFC 7845). DOM-free so that node can test it.
//
// Page layout (all integers little-endian):
//   0 "OggS" | 4 version=0 | 5 flags (1 continued, 2 first, 4 last) | 6 granule u64 | 14 serial u32
//   18 sequence u32 | 22 crc u32 | 26 nsegs u8 | 27 lacing[nsegs] | body (sum of lacing)

export const OGG_HEADER_SIZE = 27;
export const FLAG_CONTINUED = 1;
export const FLAG_FIRST = 2;
export const FLAG_LAST = 4;
const CAPTURE = [0x4f, 0x67, 0x67, 0x53]; // "OggS"

// Ogg's CRC: polynomial 0x04c11db7, MSB first, no reflection, init 0, no final xor.
const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    let r = i << 24;
    for (let j = 0; j < 8; j++) r = r & 0x80000000 ? (r << 1) ^ 0x04c11db7 : r << 1;
    table[i] = r >>> 0;
  }
  return table;
})();

/** CRC of bytes as Ogg computes it (the page's CRC field must be zero while computing). */
export function oggCrc(bytes) {
  let crc = 0;
  for (let i = 0; i < bytes.length; i++) crc = ((crc << 8) ^ CRC_TABLE[((crc >>> 24) ^ bytes[i]) & 0xff]) >>> 0;
  return crc;
}

/** CRC of a whole page, computed with its CRC field taken as zero. */
export function pageCrc(page) {
  let crc = 0;
  for (let i = 0; i < page.length; i++) {
    const b = i >= 22 && i < 26 ? 0 : page[i];
    crc = ((crc << 8) ^ CRC_TABLE[((crc >>> 24) ^ b) & 0xff]) >>> 0;
  }
  return crc;
}

function readU64(view, offset) {
  // Granule positions stay below 2^53 for any real stream; -1 (all ones) means "no packet ends here".
  const lo = view.getUint32(offset, true);
  const hi = view.getUint32(offset + 4, true);
  if (lo === 0xffffffff && hi === 0xffffffff) return -1;
  return hi * 0x100000000 + lo;
}

/**
 * Parses one complete page.
 * @param {Uint8Array} page exactly one page
 * @returns {{flags:number, granule:number, serial:number, sequence:number, crc:number, crcOk:boolean,
 *   lacing:Uint8Array, body:Uint8Array, size:number}}
 */
export function parsePage(page) {
  if (page.length < OGG_HEADER_SIZE || !hasCapture(page, 0)) throw new Error("not an Ogg page");
  const view = new DataView(page.buffer, page.byteOffset, page.byteLength);
  if (page[4] !== 0) throw new Error(`unsupported Ogg version ${page[4]}`);
  const nsegs = page[26];
  const lacing = page.subarray(OGG_HEADER_SIZE, OGG_HEADER_SIZE + nsegs);
  let bodySize = 0;
  for (const l of lacing) bodySize += l;
  const size = OGG_HEADER_SIZE + nsegs + bodySize;
  if (page.length < size) throw new Error("truncated Ogg page");
  const crc = view.getUint32(22, true);
  return {
    flags: page[5],
    granule: readU64(view, 6),
    serial: view.getUint32(14, true),
    sequence: view.getUint32(18, true),
    crc,
    crcOk: crc === pageCrc(page.subarray(0, size)),
    lacing,
    body: page.subarray(OGG_HEADER_SIZE + nsegs, size),
    size,
  };
}

function hasCapture(bytes, at) {
  return bytes[at] === CAPTURE[0] && bytes[at + 1] === CAPTURE[1] && bytes[at + 2] === CAPTURE[2] &&
    bytes[at + 3] === CAPTURE[3];
}

/**
 * Reassembles whole pages from a byte stream cut anywhere (websocket messages).
 * Bytes before a capture pattern are skipped (counted in skippedBytes); pages whose CRC is wrong are
 * dropped (counted in crcErrors) and the search resumes one byte later.
 */
export class OggPageAssembler {
  constructor({ checkCrc = true } = {}) {
    this.checkCrc = checkCrc;
    this.buffer = new Uint8Array(0);
    this.pages = 0;
    this.crcErrors = 0;
    this.skippedBytes = 0;
  }

  /** Bytes waiting for the rest of their page. */
  get pendingBytes() {
    return this.buffer.length;
  }

  /**
   * @param {Uint8Array} chunk any slice of the stream
   * @returns {Uint8Array[]} the pages completed by this chunk, in order (copies, safe to transfer)
   */
  push(chunk) {
    const merged = new Uint8Array(this.buffer.length + chunk.length);
    merged.set(this.buffer, 0);
    merged.set(chunk, this.buffer.length);
    const out = [];
    let pos = 0;
    while (true) {
      const start = this.findCapture(merged, pos);
      if (start < 0) {
        // Keep up to 3 trailing bytes: they may be the start of a split "OggS".
        const keep = Math.min(3, merged.length - pos);
        this.skippedBytes += merged.length - pos - keep;
        pos = merged.length - keep;
        break;
      }
      this.skippedBytes += start - pos;
      pos = start;
      if (merged.length - pos < OGG_HEADER_SIZE) break;
      const nsegs = merged[pos + 26];
      if (merged.length - pos < OGG_HEADER_SIZE + nsegs) break;
      let size = OGG_HEADER_SIZE + nsegs;
      for (let i = 0; i < nsegs; i++) size += merged[pos + OGG_HEADER_SIZE + i];
      if (merged.length - pos < size) break;
      const page = merged.slice(pos, pos + size);
      const crcOk = merged[pos + 4] === 0 &&
        (!this.checkCrc || new DataView(page.buffer).getUint32(22, true) === pageCrc(page));
      if (!crcOk) {
        this.crcErrors += 1;
        this.skippedBytes += 1;
        pos += 1;
        continue;
      }
      out.push(page);
      this.pages += 1;
      pos += size;
    }
    this.buffer = merged.slice(pos);
    return out;
  }

  findCapture(bytes, from) {
    for (let i = from; i + 3 < bytes.length; i++) if (hasCapture(bytes, i)) return i;
    return -1;
  }
}

/**
 * Splits the bodies of consecutive pages into packets, following lacing across page boundaries.
 * A packet ends at a lacing value below 255.
 */
export class OggPacketReader {
  constructor() {
    this.partial = [];
  }

  /**
   * @param {Uint8Array} page one whole page
   * @returns {{packets: Uint8Array[], page: ReturnType<typeof parsePage>}}
   */
  push(page) {
    const parsed = parsePage(page);
    if (!(parsed.flags & FLAG_CONTINUED)) this.partial = []; // a lost continuation: drop the fragment
    const packets = [];
    let offset = 0;
    for (const l of parsed.lacing) {
      this.partial.push(parsed.body.subarray(offset, offset + l));
      offset += l;
      if (l < 255) {
        packets.push(concatBytes(this.partial));
        this.partial = [];
      }
    }
    return { packets, page: parsed };
  }
}

/** Concatenates byte arrays into a new one. */
export function concatBytes(parts) {
  let n = 0;
  for (const p of parts) n += p.length;
  const out = new Uint8Array(n);
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

/** Lacing values for one packet: 255 per full segment, then the remainder (0 if a multiple of 255). */
export function lacingFor(packetLength) {
  const lacing = new Array(Math.floor(packetLength / 255)).fill(255);
  lacing.push(packetLength % 255);
  return lacing;
}

/**
 * Builds one page holding whole packets.
 * @param {{packets: Uint8Array[], granule: number, serial: number, sequence: number, flags?: number}} p
 * @returns {Uint8Array}
 */
export function writePage({ packets, granule, serial, sequence, flags = 0 }) {
  const lacing = [];
  for (const p of packets) lacing.push(...lacingFor(p.length));
  if (lacing.length > 255) throw new Error(`too many segments for one page (${lacing.length} > 255)`);
  const body = concatBytes(packets);
  const page = new Uint8Array(OGG_HEADER_SIZE + lacing.length + body.length);
  const view = new DataView(page.buffer);
  page.set(CAPTURE, 0);
  page[4] = 0;
  page[5] = flags;
  if (granule < 0) {
    view.setUint32(6, 0xffffffff, true);
    view.setUint32(10, 0xffffffff, true);
  } else {
    view.setUint32(6, granule % 0x100000000, true);
    view.setUint32(10, Math.floor(granule / 0x100000000), true);
  }
  view.setUint32(14, serial >>> 0, true);
  view.setUint32(18, sequence >>> 0, true);
  page[26] = lacing.length;
  page.set(lacing, OGG_HEADER_SIZE);
  page.set(body, OGG_HEADER_SIZE + lacing.length);
  view.setUint32(22, pageCrc(page), true);
  return page;
}

/**
 * The OpusHead identification packet (RFC 7845 §5.1), channel mapping family 0.
 * @returns {Uint8Array} 19 bytes
 */
export function opusHead({ channels = 1, preSkip = 312, inputSampleRate = 24000, outputGain = 0 } = {}) {
  const out = new Uint8Array(19);
  const view = new DataView(out.buffer);
  out.set(new TextEncoder().encode("OpusHead"), 0);
  out[8] = 1;
  out[9] = channels;
  view.setUint16(10, preSkip, true);
  view.setUint32(12, inputSampleRate, true);
  view.setInt16(16, outputGain, true);
  out[18] = 0;
  return out;
}

/** Parses an OpusHead packet, or returns null when the packet is not one. */
export function parseOpusHead(packet) {
  if (packet.length < 19 || new TextDecoder().decode(packet.subarray(0, 8)) !== "OpusHead") return null;
  const view = new DataView(packet.buffer, packet.byteOffset, packet.byteLength);
  return {
    version: packet[8],
    channels: packet[9],
    preSkip: view.getUint16(10, true),
    inputSampleRate: view.getUint32(12, true),
    outputGain: view.getInt16(16, true),
    mappingFamily: packet[18],
  };
}

/** The OpusTags comment packet (RFC 7845 §5.2) with a vendor string and no comments. */
export function opusTags(vendor = "openmoshi") {
  const v = new TextEncoder().encode(vendor);
  const out = new Uint8Array(8 + 4 + v.length + 4);
  const view = new DataView(out.buffer);
  out.set(new TextEncoder().encode("OpusTags"), 0);
  view.setUint32(8, v.length, true);
  out.set(v, 12);
  view.setUint32(12 + v.length, 0, true);
  return out;
}

/**
 * Samples (at 48 kHz, as Ogg-Opus granules count) in one Opus packet, from its TOC byte (RFC 6716 §3.1).
 * @returns {number} 0 for an empty or malformed packet
 */
export function opusPacketSamples48k(packet) {
  if (packet.length < 1) return 0;
  const toc = packet[0];
  const config = toc >> 3;
  let frameSize; // in 48 kHz samples
  if (config < 12) frameSize = [480, 960, 1920, 2880][config & 3]; // SILK
  else if (config < 16) frameSize = [480, 960][config & 1]; // hybrid
  else frameSize = [120, 240, 480, 960][config & 3]; // CELT
  const code = toc & 3;
  let frames;
  if (code === 0) frames = 1;
  else if (code === 1 || code === 2) frames = 2;
  else {
    if (packet.length < 2) return 0;
    frames = packet[1] & 0x3f;
  }
  return frames * frameSize;
}
