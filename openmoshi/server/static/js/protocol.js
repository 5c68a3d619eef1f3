// Moshi websocket protocol: binary frames, byte 0 = kind, the rest = payload.
// Kept DOM-free so that node can test it.

/** Message kinds, by wire value. */
export const Kind = Object.freeze({
  HANDSHAKE: 0,
  AUDIO: 1,
  TEXT: 2,
  CONTROL: 3,
  METADATA: 4,
  ERROR: 5,
  PING: 6,
  COLORED_TEXT: 7,
});

/** Short names used for counters (window.moshiDebug.received[name]). */
export const KIND_NAMES = Object.freeze([
  "handshake", "audio", "text", "control", "metadata", "error", "ping", "coloredText",
]);

/** Control actions carried in the first payload byte of a kind-3 message. */
export const CONTROL_ACTIONS = Object.freeze(["start", "endTurn", "pause", "restart"]);

/** Query parameters sent on the websocket URL, in the order the official client sends them. */
export const QUERY_PARAMS = Object.freeze([
  "text_temperature", "text_topk", "audio_temperature", "audio_topk", "pad_mult",
  "text_seed", "audio_seed", "repetition_penalty_context", "repetition_penalty",
]);

export class ProtocolError extends Error {
  constructor(message) {
    super(message);
    this.name = "ProtocolError";
  }
}

const utf8Decoder = new TextDecoder("utf-8");
const utf8Encoder = new TextEncoder();

function toBytes(data) {
  if (data instanceof Uint8Array) return data;
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  throw new ProtocolError(`expected a binary frame, got ${typeof data}`);
}

/**
 * Decodes one websocket frame.
 * @param {ArrayBuffer|Uint8Array} data the whole frame
 * @returns {{kind: number, name: string, size: number, payload: Uint8Array, ...}} fields per kind:
 *   handshake: protocolVersion, modelVersion (null when the server sends the 1-byte form);
 *   text/error: text; coloredText: color, text; control: action; metadata: data.
 * @throws {ProtocolError} on an empty frame, an unknown kind or a malformed payload.
 */
export function decodeMessage(data) {
  const bytes = toBytes(data);
  if (bytes.length === 0) throw new ProtocolError("empty message");
  const kind = bytes[0];
  const payload = bytes.subarray(1);
  if (kind >= KIND_NAMES.length) throw new ProtocolError(`unknown message kind ${kind}`);
  const msg = { kind, name: KIND_NAMES[kind], size: bytes.length, payload };
  switch (kind) {
    case Kind.HANDSHAKE: {
      // Python server: a single 0 byte; Rust server: 0 + two little-endian u32 (protocol, model).
      msg.protocolVersion = null;
      msg.modelVersion = null;
      if (payload.length >= 8) {
        const view = new DataView(payload.buffer, payload.byteOffset, payload.byteLength);
        msg.protocolVersion = view.getUint32(0, true);
        msg.modelVersion = view.getUint32(4, true);
      }
      break;
    }
    case Kind.TEXT:
    case Kind.ERROR:
      msg.text = utf8Decoder.decode(payload);
      break;
    case Kind.COLORED_TEXT:
      if (payload.length < 1) throw new ProtocolError("colored text without a color byte");
      msg.color = payload[0];
      msg.text = utf8Decoder.decode(payload.subarray(1));
      break;
    case Kind.CONTROL:
      if (payload.length < 1) throw new ProtocolError("control message without an action byte");
      msg.action = CONTROL_ACTIONS[payload[0]] ?? `unknown(${payload[0]})`;
      break;
    case Kind.METADATA: {
      const text = utf8Decoder.decode(payload);
      try {
        msg.data = JSON.parse(text);
      } catch (err) {
        throw new ProtocolError(`metadata is not JSON: ${err.message}`);
      }
      break;
    }
    default:
      break; // audio and ping: the payload is all there is
  }
  return msg;
}

/**
 * Builds one frame: the kind byte followed by the payload.
 * @param {number} kind one of Kind
 * @param {Uint8Array|string} [payload] strings are UTF-8 encoded
 * @returns {Uint8Array}
 */
export function encodeMessage(kind, payload = new Uint8Array(0)) {
  if (!Number.isInteger(kind) || kind < 0 || kind >= KIND_NAMES.length) {
    throw new ProtocolError(`unknown message kind ${kind}`);
  }
  const body = typeof payload === "string" ? utf8Encoder.encode(payload) : toBytes(payload);
  const out = new Uint8Array(1 + body.length);
  out[0] = kind;
  out.set(body, 1);
  return out;
}

/** True when an error message (kind 5) means that every slot on the server is taken. */
export function isBusyError(text) {
  return /\bbusy\b/i.test(text) || /\bno (free )?slot/i.test(text);
}

/**
 * The websocket URL for a chat, next to the page: http -> ws, https -> wss.
 * @param {string} pageHref the page's location.href
 * @param {Record<string, number|string>} params values for QUERY_PARAMS (all required)
 * @param {string|null} [token] auth token copied from the page URL, if any
 * @returns {string}
 */
export function buildChatUrl(pageHref, params, token = null) {
  const url = new URL("api/chat", pageHref);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  url.search = "";
  url.hash = "";
  for (const name of QUERY_PARAMS) {
    if (params[name] === undefined || params[name] === null || params[name] === "") {
      throw new ProtocolError(`missing query parameter ${name}`);
    }
    url.searchParams.append(name, String(params[name]));
  }
  if (token) url.searchParams.append("token", token);
  return url.toString();
}
