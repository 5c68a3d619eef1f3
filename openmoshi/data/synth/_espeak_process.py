"""Standalone espeak-ng runner (run as a script, so it imports neither openmoshi nor torch).

libespeak-ng keeps state between utterances (glottal pulse phase, filter memories, libc rand), so the same
text can come out a few samples different depending on what was said before. Each dialogue's clauses are
therefore synthesized in a fresh process, in a fixed order: the same jobs give the same samples.

stdin: JSON list of {"text", "voice", "rate", "pitch", "range"}. stdout, per job: one JSON header line
{"samples": N, "rate": R, "words": [[text_position, sample], ...], "error": str|null}, then N int16 samples.
"""

import ctypes
import ctypes.util
import json
import sys


class Event(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", ctypes.c_char * 8)]


CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(Event))
EVENT_LIST_END, EVENT_WORD = 0, 1
PARAM_RATE, PARAM_PITCH, PARAM_RANGE = 1, 3, 4
AUDIO_OUTPUT_SYNCHRONOUS, INIT_DONT_EXIT = 0x02, 0x8000


def main() -> int:
    jobs = json.loads(sys.stdin.read())
    out = sys.stdout.buffer
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1")
    except OSError as exc:
        out.write((json.dumps({"fatal": f"libespeak-ng not found ({exc})"}) + "\n").encode())
        return 1
    rate = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, None, INIT_DONT_EXIT)
    if rate <= 0:
        out.write((json.dumps({"fatal": "libespeak-ng failed to initialise"}) + "\n").encode())
        return 1
    audio, words = [], []

    def on_audio(wav, count, events):
        if wav and count > 0:
            audio.append(ctypes.string_at(wav, 2 * count))
        i = 0
        while events[i].type != EVENT_LIST_END:
            if events[i].type == EVENT_WORD:
                words.append([events[i].text_position, events[i].sample])
            i += 1
        return 0

    callback = CALLBACK(on_audio)
    lib.espeak_SetSynthCallback(callback)
    lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                 ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    for job in jobs:
        audio.clear()
        words.clear()
        error = None
        if lib.espeak_SetVoiceByName(job["voice"].encode()) != 0:
            error = f"espeak-ng has no voice {job['voice']!r} (see `espeak-ng --voices`)"
        else:
            for param, key in ((PARAM_RATE, "rate"), (PARAM_PITCH, "pitch"), (PARAM_RANGE, "range")):
                lib.espeak_SetParameter(param, int(job[key]), 0)
            data = job["text"].encode()
            lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, 0, None, None)
            lib.espeak_Synchronize()
        pcm = b"".join(audio)
        header = {"samples": len(pcm) // 2, "rate": rate, "words": list(words), "error": error}
        out.write((json.dumps(header) + "\n").encode())
        out.write(pcm)
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
