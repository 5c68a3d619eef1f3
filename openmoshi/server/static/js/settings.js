// Sampling settings sent as query parameters on the websocket URL. DOM-free so that node can test it.

/**
 * One entry per query parameter: its label, bounds, and whether it must be an integer.
 * Seeds of -1 mean "pick a random seed for each conversation" (done here, so the server always gets a
 * concrete seed and the page can show which one was used).
 */
export const SETTINGS = Object.freeze([
  { name: "text_temperature", label: "Text temperature", def: 0.7, min: 0, max: 2, step: 0.05 },
  { name: "text_topk", label: "Text top-k", def: 25, min: 1, max: 1000, step: 1, integer: true },
  { name: "audio_temperature", label: "Audio temperature", def: 0.8, min: 0, max: 2, step: 0.05 },
  { name: "audio_topk", label: "Audio top-k", def: 250, min: 1, max: 2048, step: 1, integer: true },
  { name: "pad_mult", label: "Padding multiplier", def: 0, min: -4, max: 4, step: 0.1 },
  { name: "repetition_penalty", label: "Repetition penalty", def: 1.0, min: 1, max: 2, step: 0.01 },
  {
    name: "repetition_penalty_context", label: "Repetition penalty context", def: 64, min: 0, max: 200,
    step: 1, integer: true,
  },
  { name: "text_seed", label: "Text seed (-1 = random)", def: -1, min: -1, max: 2 ** 31 - 1, step: 1, integer: true },
  { name: "audio_seed", label: "Audio seed (-1 = random)", def: -1, min: -1, max: 2 ** 31 - 1, step: 1, integer: true },
]);

// v2 keeps only the settings a user changed from the served model's defaults (v1 kept every value, so a model's
// own defaults never applied to a returning user).
export const STORAGE_KEY = "openmoshi.settings.v2";

/**
 * The default of every setting: the official client's, overridden by the served model's (GET /api/defaults,
 * its config.json's lm_gen_config) where those are valid values of the setting.
 * @param {Record<string, unknown>} [server]
 * @returns {Record<string, number>}
 */
export function defaultSettings(server = {}) {
  const out = {};
  for (const s of SETTINGS) {
    const v = server && typeof server === "object" ? server[s.name] : undefined;
    const ok = typeof v === "number" && Number.isFinite(v) && v >= s.min && v <= s.max &&
      (!s.integer || Number.isInteger(v));
    out[s.name] = ok ? v : s.def;
  }
  return out;
}

/**
 * Checks and converts raw values (strings from inputs or the URL). Missing names take their default.
 * @param {Record<string, unknown>} raw
 * @param {Record<string, number>} [defaults] from defaultSettings()
 * @returns {{values: Record<string, number>, errors: Record<string, string>}}
 */
export function validateSettings(raw, defaults = defaultSettings()) {
  const values = {};
  const errors = {};
  for (const s of SETTINGS) {
    const input = raw[s.name];
    if (input === undefined || input === null || input === "") {
      values[s.name] = defaults[s.name];
      continue;
    }
    const v = typeof input === "number" ? input : Number(String(input).trim());
    if (!Number.isFinite(v)) {
      errors[s.name] = `${s.label} must be a number`;
    } else if (s.integer && !Number.isInteger(v)) {
      errors[s.name] = `${s.label} must be a whole number`;
    } else if (v < s.min || v > s.max) {
      errors[s.name] = `${s.label} must be between ${s.min} and ${s.max}`;
    } else {
      values[s.name] = v;
      continue;
    }
    values[s.name] = defaults[s.name];
  }
  return { values, errors };
}

/**
 * Settings to start from: defaults, overridden by stored values, overridden by the page's query string.
 * @param {string|null} stored JSON from localStorage, or null
 * @param {string} search the page's location.search
 * @param {Record<string, number>} [defaults] from defaultSettings()
 */
export function initialSettings(stored, search, defaults = defaultSettings()) {
  let raw = {};
  if (stored) {
    try {
      const parsed = JSON.parse(stored);
      if (parsed && typeof parsed === "object") raw = parsed;
    } catch {
      // a corrupt entry is ignored: defaults apply
    }
  }
  const params = new URLSearchParams(search);
  for (const s of SETTINGS) if (params.has(s.name)) raw[s.name] = params.get(s.name);
  return validateSettings(raw, defaults).values;
}

/**
 * What to store: the settings that differ from the defaults (the rest follow the served model).
 * @param {Record<string, number>} values validated settings
 * @param {Record<string, number>} defaults
 */
export function changedSettings(values, defaults) {
  const changed = SETTINGS.filter((s) => values[s.name] !== defaults[s.name]);
  return Object.fromEntries(changed.map((s) => [s.name, values[s.name]]));
}

/**
 * The values to send for one conversation: seeds of -1 replaced by random ones.
 * @param {Record<string, number>} values validated settings
 * @param {() => number} [random] returns a float in [0, 1)
 */
export function resolveSeeds(values, random = Math.random) {
  const out = { ...values };
  for (const name of ["text_seed", "audio_seed"]) {
    if (out[name] < 0) out[name] = Math.floor(random() * 1_000_000_000);
  }
  return out;
}
