"""Say a text with a text-to-speech model (Kyutai's `tts` family) and write it as a wav, with word timings.

  openmoshi speak --model hf://kyutai/tts-1.6b-en_fr --voice voice.safetensors "Hello there." --out hello.wav
  openmoshi speak --model tiny-tts --text-file story.txt --out story.wav --cfg-coef 2 --padding-bonus 1

Writes OUT (24 kHz mono) and OUT with .json beside it: the words with their start and end in seconds.
A voice is a voice-embedding file (Kyutai's tts-voices `*.safetensors`, for models conditioned on a speaker),
or an audio file used as a spoken prompt (`--voice prompt.wav`, for models without voice embeddings).
Blank lines in --text-file separate speaker turns (main speaker first); `<break time="0.5s"/>` makes a pause.

A Moshi-style model whose config.json `delays` put its audio behind the text (paper §5.7, e.g. [0, 25, 26, ...]:
2 s) speaks too, in its own voice (no --voice, no guidance): words are forced when it asks for one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from ..errors import ConfigError
from .common import add_device_arguments, resolve_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", nargs="?", default=None, help="the text to say (or use --text-file)")
    parser.add_argument("--text-file", type=Path, default=None, help="read the text from this file")
    parser.add_argument("--model", default="hf://kyutai/tts-1.6b-en_fr",
                        help="tts model folder or hf://owner/repo in Kyutai's layout, or a Moshi-style model made "
                             "TTS by its delays")
    parser.add_argument("--voice", type=Path, default=None,
                        help="voice embedding (.safetensors) or audio prompt (wav/flac/...)")
    parser.add_argument("--out", type=Path, required=True, help="output wav file")
    parser.add_argument("--cfg-coef", type=float, default=None,
                        help="classifier-free guidance (default 2; 1 = off; distilled models accept their listed "
                             "values)")
    parser.add_argument("--temp", type=float, default=0.6, help="sampling temperature (0 = greedy)")
    parser.add_argument("--top-k", type=int, default=250,
                        help="sample the audio among the K likeliest codes (the text among min(K, 25); 1 = greedy)")
    parser.add_argument("--padding-bonus", type=float, default=0.0,
                        help="added to the padding logit: > 0 speaks slower, < 0 faster")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="stop after this much audio")
    parser.add_argument("--seed", type=int, default=None, help="random seed, for reproducible speech")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_device_arguments(parser)


def _turns(args: argparse.Namespace) -> list[str]:
    if (args.text is None) == (args.text_file is None):
        raise ConfigError("give the text to say either as an argument or with --text-file (one of them)")
    if args.text_file is not None:
        try:
            raw = args.text_file.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read --text-file {args.text_file}: {exc}") from exc
        turns = [" ".join(block.split()) for block in raw.split("\n\n")]
    else:
        turns = [" ".join(args.text.split())]
    turns = [t for t in turns if t]
    if not turns:
        raise ConfigError("the text is empty: nothing to say")
    return turns


def run(args: argparse.Namespace) -> int:
    import torch

    from ..audio.io import load_audio
    from ..bundle import load_model
    from ..generation.tts import Synthesizer, voice_condition
    from ..lm.families import delayed_mode

    turns = _turns(args)
    if args.max_seconds <= 0:
        raise ConfigError("--max-seconds must be positive")
    if args.top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {args.top_k}")
    device, dtype = resolve_device(args)
    bundle = load_model(args.model, device=device, dtype=dtype)
    steps = int(args.max_seconds * bundle.mimi.frame_rate)
    if delayed_mode(bundle.config, "tts", "openmoshi speak") is not None:
        return _speak_delayed(args, bundle, turns, steps)
    synth = Synthesizer(bundle, temp=args.temp, cfg_coef=2.0 if args.cfg_coef is None else args.cfg_coef,
                        padding_bonus=args.padding_bonus, max_steps=steps, seed=args.seed, top_k=args.top_k)
    voices, prefixes = None, None
    if args.voice is not None:
        if not args.voice.is_file():
            raise ConfigError(f"--voice {args.voice}: no such file")
        if args.voice.suffix in (".safetensors", ".sft"):
            if not synth.multi_speaker:
                raise ConfigError("this model takes no voice embedding; give an audio prompt (--voice prompt.wav)")
            voices = [voice_condition(str(args.voice))]
        else:
            if synth.multi_speaker:
                raise ConfigError("this model takes a voice embedding (--voice voice.safetensors), not audio")
            wav = load_audio(args.voice).wav.to(device)
            with torch.no_grad():
                codes = bundle.mimi.encode(wav[None])[0, :, :-2]
            prefixes = [torch.cat([torch.full_like(codes[:1], -1), codes]).cpu()]
    elif synth.multi_speaker:
        raise ConfigError("this model needs a voice: --voice FILE.safetensors (a voice embedding, e.g. from "
                          "kyutai/tts-voices)")
    with tqdm(total=steps, unit="step", desc="speaking", disable=args.quiet) as bar:
        speech = synth.speak([turns], voices, prefixes, on_step=lambda n: bar.update(n - bar.n))[0]
    return _write(args, bundle, turns, speech)


def _speak_delayed(args: argparse.Namespace, bundle, turns: list[str], steps: int) -> int:
    """A Moshi-style model made TTS by its delays: its own voice, no conditioning."""
    from ..generation.delayed import DelayedSynthesizer

    if args.voice is not None:
        raise ConfigError("a Moshi-style TTS model speaks in its own voice: it takes no --voice")
    if args.cfg_coef not in (None, 1.0):
        raise ConfigError("a Moshi-style TTS model has no conditions to guide: --cfg-coef must be 1 (or left out)")
    synth = DelayedSynthesizer(bundle, temp=args.temp, padding_bonus=args.padding_bonus, max_steps=steps,
                               seed=args.seed, top_k=args.top_k)
    with tqdm(total=steps, unit="step", desc="speaking", disable=args.quiet) as bar:
        speech = synth.speak([turns], on_step=lambda n: bar.update(n - bar.n))[0]
    return _write(args, bundle, turns, speech)


def _write(args: argparse.Namespace, bundle, turns: list[str], speech) -> int:
    from ..audio.io import save_wav

    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_wav(args.out, speech.audio, bundle.sample_rate)
    timings = args.out.with_suffix(".json")
    timings.write_text(json.dumps({"text": " ".join(turns), "finished": speech.finished,
                                   "words": [vars(w) for w in speech.words]}, indent=2) + "\n")
    seconds = speech.audio.shape[-1] / bundle.sample_rate
    print(f"wrote {args.out} ({seconds:.2f} s, {len(speech.words)} words) and {timings}")
    if not speech.finished:
        print(f"warning: stopped after --max-seconds {args.max_seconds} before the end of the text")
    return 0
