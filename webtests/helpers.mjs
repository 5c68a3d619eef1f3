// Shared helpers for the page's node tests.
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";

export const STATIC_DIR = fileURLToPath(new URL("../openmoshi/server/static/", import.meta.url));
export const JS = (name) => new URL(`../openmoshi/server/static/js/${name}`, import.meta.url).href;

export function fixture(name) {
  return new Uint8Array(readFileSync(new URL(`./fixtures/${name}`, import.meta.url)));
}

/** Small deterministic PRNG (mulberry32) so random chunkings are reproducible. */
export function rng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Cuts bytes into consecutive chunks of random sizes in [1, maxSize]. */
export function randomChunks(bytes, random, maxSize) {
  const out = [];
  let pos = 0;
  while (pos < bytes.length) {
    const n = 1 + Math.floor(random() * maxSize);
    out.push(bytes.subarray(pos, pos + n));
    pos += n;
  }
  return out;
}

/** Splits a stream of whole pages at their boundaries, using the page header only. */
export function splitPagesByHeader(bytes) {
  const pages = [];
  let pos = 0;
  while (pos < bytes.length) {
    const nsegs = bytes[pos + 26];
    let size = 27 + nsegs;
    for (let i = 0; i < nsegs; i++) size += bytes[pos + 27 + i];
    pages.push(bytes.subarray(pos, pos + size));
    pos += size;
  }
  return pages;
}

export function bytesEqual(a, b) {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}
