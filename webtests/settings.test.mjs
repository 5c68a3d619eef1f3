import { test } from "node:test";
import assert from "node:assert/strict";
import { QUERY_PARAMS } from "../openmoshi/server/static/js/protocol.js";
import {
  SETTINGS, changedSettings, defaultSettings, initialSettings, resolveSeeds, validateSettings,
} from "../openmoshi/server/static/js/settings.js";

test("defaults are the official client's", () => {
  assert.deepEqual(defaultSettings(), {
    text_temperature: 0.7, text_topk: 25, audio_temperature: 0.8, audio_topk: 250, pad_mult: 0,
    repetition_penalty: 1.0, repetition_penalty_context: 64, text_seed: -1, audio_seed: -1,
  });
  assert.deepEqual(SETTINGS.map((s) => s.name).sort(), [...QUERY_PARAMS].sort());
});

test("validation converts strings and reports bad values by name", () => {
  const { values, errors } = validateSettings({
    text_temperature: "0.5", text_topk: "2.5", audio_topk: "abc", audio_temperature: "9", pad_mult: "",
  });
  assert.equal(values.text_temperature, 0.5);
  assert.match(errors.text_topk, /whole number/);
  assert.match(errors.audio_topk, /must be a number/);
  assert.match(errors.audio_temperature, /between 0 and 2/);
  assert.equal(values.text_topk, 25); // invalid values fall back to the default
  assert.equal(values.pad_mult, 0);
  assert.equal(errors.pad_mult, undefined);
});

test("initial settings: defaults < stored < page URL; corrupt storage is ignored", () => {
  const stored = JSON.stringify({ text_topk: 50, audio_topk: 100 });
  const s = initialSettings(stored, "?audio_topk=10&token=x&text_seed=7");
  assert.equal(s.text_topk, 50);
  assert.equal(s.audio_topk, 10);
  assert.equal(s.text_seed, 7);
  assert.equal(s.text_temperature, 0.7);
  assert.deepEqual(initialSettings("{not json", ""), defaultSettings());
});

test("seeds of -1 become random non-negative integers; fixed seeds are kept", () => {
  const values = { ...defaultSettings(), audio_seed: 99 };
  const r = resolveSeeds(values, () => 0.123456789);
  assert.equal(r.text_seed, 123456789);
  assert.equal(r.audio_seed, 99);
  assert.equal(values.text_seed, -1); // input untouched
  const r2 = resolveSeeds(defaultSettings());
  assert.ok(Number.isInteger(r2.text_seed) && r2.text_seed >= 0);
});

test("the served model's defaults replace the client's where valid; only changes are stored", () => {
  const served = defaultSettings({ text_temperature: 0.3, audio_topk: 50, text_topk: 2.5, pad_mult: "x", extra: 1 });
  assert.equal(served.text_temperature, 0.3);
  assert.equal(served.audio_topk, 50);
  assert.equal(served.text_topk, 25); // not a whole number: the client's default
  assert.equal(served.pad_mult, 0);
  assert.equal("extra" in served, false);
  assert.deepEqual(defaultSettings(null), defaultSettings());
  // missing and invalid values fall back to the model's defaults
  const { values } = validateSettings({ audio_temperature: "", text_temperature: "nan" }, served);
  assert.equal(values.text_temperature, 0.3);
  // stored changes and the URL still win over the model
  const s = initialSettings(JSON.stringify({ text_topk: 40 }), "?audio_topk=7", served);
  assert.deepEqual([s.text_temperature, s.text_topk, s.audio_topk], [0.3, 40, 7]);
  assert.deepEqual(changedSettings({ ...served, text_topk: 40 }, served), { text_topk: 40 });
  assert.deepEqual(changedSettings(served, served), {});
});
