// The page: wires the DOM to a MoshiSession and exposes window.moshiDebug for tests.

import { BrowserAudio, microphoneUnavailableReason } from "./audio-io.js";
import { MoshiSession, State, streamStats } from "./session.js";
import {
  SETTINGS, STORAGE_KEY, changedSettings, defaultSettings, initialSettings, resolveSeeds, validateSettings,
} from "./settings.js";

const $ = (id) => document.getElementById(id);

const STATE_LABELS = {
  idle: "idle",
  connecting: "connecting",
  waiting: "waiting for a slot",
  connected: "connected",
  busy: "server busy",
  error: "error",
  closed: "closed",
};

function readStoredSettings() {
  try {
    return localStorage.getItem(STORAGE_KEY);
  } catch {
    return null; // storage blocked: defaults apply
  }
}

function storeSettings(values) {
  try {
    localStorage.setItem(STORAGE_KEY, JSON.stringify(values));
  } catch {
    // storage blocked: settings last for this page only
  }
}

function buildSettingsForm(form, values) {
  form.replaceChildren();
  for (const s of SETTINGS) {
    const label = document.createElement("label");
    label.textContent = s.label;
    const input = document.createElement("input");
    input.type = "number";
    input.name = s.name;
    input.id = `setting-${s.name}`;
    input.min = String(s.min);
    input.max = String(s.max);
    input.step = String(s.step);
    input.value = String(values[s.name]);
    const error = document.createElement("span");
    error.className = "error";
    error.id = `error-${s.name}`;
    label.append(input, error);
    form.append(label);
  }
}

function readSettingsForm(form, defaults) {
  const raw = Object.fromEntries(new FormData(form).entries());
  const { values, errors } = validateSettings(raw, defaults);
  for (const s of SETTINGS) {
    const input = form.elements.namedItem(s.name);
    input.setAttribute("aria-invalid", errors[s.name] ? "true" : "false");
    $(`error-${s.name}`).textContent = errors[s.name] || "";
  }
  return { values, ok: Object.keys(errors).length === 0 };
}

function formatClock(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(2)} MiB`;
}

function levelToPercent(rms) {
  // -60 dBFS .. 0 dBFS onto 0 .. 100 %
  if (!(rms > 0)) return 0;
  const db = 20 * Math.log10(rms);
  return Math.max(0, Math.min(100, ((db + 60) / 60) * 100));
}

function renderStats(dl, d) {
  const rows = [
    ["State", `${d.state}${d.detail ? ` — ${d.detail}` : ""}`],
    ["Server URL", d.url || "—"],
    ["Seeds used", d.params ? `text ${d.params.text_seed}, audio ${d.params.audio_seed}` : "—"],
    [
      "Handshake",
      d.handshake
        ? `after ${d.handshake.afterMs} ms` +
          (d.handshake.protocolVersion !== null
            ? ` (protocol ${d.handshake.protocolVersion}, model ${d.handshake.modelVersion})`
            : "")
        : "—",
    ],
  ];
  for (const [name, c] of Object.entries(d.received)) {
    if (c.messages > 0) rows.push([`Received ${name}`, `${c.messages} msgs, ${formatBytes(c.bytes)}`]);
  }
  rows.push(
    ["Sent audio", `${d.sent.audio.messages} pages, ${formatBytes(d.sent.audio.bytes)}` +
      (d.sent.droppedAudioPages ? ` (${d.sent.droppedAudioPages} dropped)` : "")],
    ["Ogg pages in", `${d.ogg.pages} (${d.ogg.crcErrors} bad CRC, ${d.ogg.skippedBytes} bytes skipped)`],
    ["Audio played", `${d.audio.secondsPlayed.toFixed(1)} s at ${d.audio.sampleRate ?? "—"} Hz`],
    ["Playback buffer", `${d.audio.bufferedMs.toFixed(0)} ms, ${d.audio.underruns} underruns, ` +
      `${d.audio.samplesDropped} samples dropped`],
    ["Recording", `${d.audio.recordedSeconds.toFixed(1)} s`],
    ["Missed audio", `${streamStats(d).missedAudioS.toFixed(2)} s`],
    ["Latency", `${streamStats(d).latencyMs.toFixed(0)} ms`],
  );
  if (d.metadata) rows.push(["Server metadata", JSON.stringify(d.metadata)]);
  dl.replaceChildren();
  for (const [k, v] of rows) {
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = v;
    dl.append(dt, dd);
  }
}

function main() {
  const params = new URLSearchParams(location.search);
  const token = params.get("token");
  const audio = new BrowserAudio();
  const session = new MoshiSession({
    createSocket: (url) => new WebSocket(url),
    audio,
    pageHref: location.href,
    token,
  });
  // Live object: tests read e.g. moshiDebug.received.audio.bytes, moshiDebug.audio.samplesPlayed.
  window.moshiDebug = session.debug;

  const form = $("settings");
  let defaults = defaultSettings();
  let edited = false; // the user typed in the form: the served model's defaults must not overwrite it
  form.addEventListener("input", () => { edited = true; });
  buildSettingsForm(form, initialSettings(readStoredSettings(), location.search, defaults));
  // The served model's own defaults (its config.json), where the server gives them.
  fetch("api/defaults", { credentials: "same-origin" })
    .then((r) => (r.ok ? r.json() : {}))
    .then((served) => {
      defaults = defaultSettings(served);
      if (!edited && !session.active) {
        buildSettingsForm(form, initialSettings(readStoredSettings(), location.search, defaults));
      }
    })
    .catch(() => {}); // an older server: the official client's defaults stay
  $("reset-settings").addEventListener("click", () => {
    buildSettingsForm(form, defaults);
    storeSettings({});
  });

  const unavailable = microphoneUnavailableReason(window);
  if (unavailable) {
    $("banner").textContent = unavailable;
    $("banner").hidden = false;
    session.debug.lastError = unavailable;
    session.setState(State.ERROR, "The microphone cannot be used here (see above).");
  }

  const transcript = $("transcript");
  let transcriptEmpty = true;
  const showPlaceholder = (text) => {
    const span = Object.assign(document.createElement("span"), { className: "placeholder", textContent: text });
    transcript.replaceChildren(span);
  };
  const IDLE_PLACEHOLDER = "Moshi's words will appear here.";
  const LISTENING_PLACEHOLDER = "Listening…";
  session.onText(({ text: piece, color }) => {
    let text = piece;
    if (transcriptEmpty) {
      text = piece.trimStart(); // pieces start with a space; the first one needs none
      if (!text) return;
      transcript.replaceChildren();
      transcriptEmpty = false;
    }
    const atBottom = transcript.scrollHeight - transcript.scrollTop - transcript.clientHeight < 24;
    if (color) {
      const span = document.createElement("span");
      span.className = `c${color}`;
      span.textContent = text;
      transcript.append(span);
    } else {
      transcript.append(document.createTextNode(text));
    }
    if (atBottom) transcript.scrollTop = transcript.scrollHeight;
  });

  let framePending = false;
  const render = () => {
    framePending = false;
    const d = session.debug;
    document.body.dataset.state = d.state;
    const badge = $("state-badge");
    const behind = d.state === "connected" && streamStats(d).behind;
    badge.dataset.state = behind ? "behind" : d.state;
    badge.textContent = behind ? "behind" : STATE_LABELS[d.state] || d.state;
    $("state-detail").textContent = d.detail || "";
    const active = session.active;
    // A conversation that ended before Moshi said a word (busy server, error) must not keep "Listening…".
    if (!active && transcriptEmpty && transcript.textContent === LISTENING_PLACEHOLDER) {
      showPlaceholder(IDLE_PLACEHOLDER);
    }
    $("start").disabled = active || Boolean(unavailable);
    $("stop").disabled = !active;
    $("download").disabled = !(audio.tape && audio.tape.frames > 0);
    for (const el of form.elements) el.disabled = active;
    $("reset-settings").disabled = active;
    $("mic-level").style.width = `${levelToPercent(active ? d.audio.micLevel : 0)}%`;
    $("moshi-level").style.width = `${levelToPercent(active ? d.audio.moshiLevel : 0)}%`;
    const end = active ? Date.now() : d.endedAt ?? Date.now();
    $("clock").textContent = formatClock(d.connectedAt ? (end - d.connectedAt) / 1000 : 0);
    if ($("stats-panel").open) renderStats($("stats"), d);
  };
  session.subscribe(() => {
    if (!framePending) {
      framePending = true;
      requestAnimationFrame(render);
    }
  });
  $("stats-panel").addEventListener("toggle", render);
  setInterval(() => session.active && render(), 500); // keeps the clock moving between messages

  $("start").addEventListener("click", () => {
    const { values, ok } = readSettingsForm(form, defaults);
    if (!ok) {
      $("settings-panel").open = true;
      return;
    }
    storeSettings(changedSettings(values, defaults));
    showPlaceholder(LISTENING_PLACEHOLDER);
    transcriptEmpty = true;
    // start() creates the AudioContext synchronously, inside this click.
    session.start(resolveSeeds(values)).catch((err) => console.error(err));
  });
  $("stop").addEventListener("click", () => session.stop("stopped by you"));

  $("download").addEventListener("click", () => {
    if (!audio.tape || audio.tape.frames === 0) return;
    const blob = new Blob([audio.tape.toWav()], { type: "audio/wav" });
    const url = URL.createObjectURL(blob);
    const a = document.createElement("a");
    const stamp = new Date().toISOString().replace(/[:T]/g, "-").slice(0, 19);
    a.href = url;
    a.download = `moshi-conversation-${stamp}.wav`;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10_000);
  });

  window.addEventListener("pagehide", () => {
    if (session.active) session.stop("page closed");
  });
  render();
}

main();
