// The page must work with no network beyond its own server: every reference is relative and exists.
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, readFileSync, readdirSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { STATIC_DIR } from "./helpers.mjs";
import {
  MIC_CONSTRAINTS, describeMicError, microphoneUnavailableReason,
} from "../openmoshi/server/static/js/audio-io.js";

const JS_DIR = join(STATIC_DIR, "js");

test("index.html references only local files that exist", () => {
  const html = readFileSync(join(STATIC_DIR, "index.html"), "utf8");
  const refs = [...html.matchAll(/\b(?:src|href)="([^"]+)"/g)].map((m) => m[1]);
  assert.ok(refs.length >= 3);
  for (const ref of refs) {
    assert.ok(!/^[a-z]+:|^\/\//i.test(ref), `external reference ${ref}`);
    assert.ok(existsSync(resolve(STATIC_DIR, ref)), `missing ${ref}`);
  }
});

test("modules import only relative modules that exist, and fetch nothing from elsewhere", () => {
  for (const name of readdirSync(JS_DIR).filter((n) => n.endsWith(".js"))) {
    const src = readFileSync(join(JS_DIR, name), "utf8");
    for (const m of src.matchAll(/^\s*import\s[^"']*["']([^"']+)["']/gm)) {
      assert.ok(m[1].startsWith("./"), `${name} imports ${m[1]}`);
      assert.ok(existsSync(resolve(dirname(join(JS_DIR, name)), m[1])), `${name}: missing ${m[1]}`);
    }
    for (const m of src.matchAll(/new URL\("([^"]+)"/g)) {
      assert.ok(!/^[a-z]+:/i.test(m[1]), `${name} builds an absolute URL ${m[1]}`);
    }
    assert.ok(!/https?:\/\/(?!localhost)/.test(src.replace(/\/\/.*$/gm, "")), `${name} mentions a remote URL`);
  }
});

test("vendored codec files and their license are present", () => {
  const dir = join(STATIC_DIR, "vendor", "opus-recorder");
  for (const f of ["encoderWorker.min.js", "decoderWorker.min.js", "decoderWorker.min.wasm", "LICENSE.md"]) {
    assert.ok(existsSync(join(dir, f)), f);
  }
  assert.match(readFileSync(join(dir, "LICENSE.md"), "utf8"), /MIT/);
});

test("microphone constraints and user-facing messages", () => {
  assert.deepEqual(MIC_CONSTRAINTS.audio, {
    echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1,
  });
  const insecure = microphoneUnavailableReason({ isSecureContext: false, navigator: {}, location: { host: "10.0.0.5:8998" } });
  assert.match(insecure, /10\.0\.0\.5:8998/);
  assert.match(insecure, /localhost/);
  assert.match(insecure, /HTTPS/);
  const noDevices = microphoneUnavailableReason({ isSecureContext: true, navigator: {}, location: { host: "x" } });
  assert.match(noDevices, /secure origins/);
  assert.match(describeMicError({ name: "NotAllowedError" }), /denied/);
  assert.match(describeMicError({ name: "NotFoundError" }), /No microphone/);
  assert.match(describeMicError(new Error("weird")), /weird/);
});
