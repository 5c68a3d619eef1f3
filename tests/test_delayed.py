"""Moshi-style models made ASR or TTS by their delays (paper §5.7): the mode from config.json, step parity with
moshi 0.2.13's LMGen fed the same way, streamed == one teacher-forced pass, and `transcribe` / `speak`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf
import torch
from conftest import init_preset, read_speech
from lm_utils import kyutai_kwargs

from openmoshi.bundle import load_model
from openmoshi.cli.main import main
from openmoshi.errors import ConfigError
from openmoshi.generation.delayed import DelayedSynthesizer, DelayedTranscriber, MoshiTextForcer
from openmoshi.generation.stt import transcribe_recordings, transcriber
from openmoshi.generation.tts import TtsTokens, Word
from openmoshi.lm.config import LMConfig
from openmoshi.lm.families import DelayedMode, delayed_mode

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_asr(tmp_path_factory) -> Path:
    return init_preset(tmp_path_factory.mktemp("asr") / "asr", "tiny-moshi-asr", 1)


@pytest.fixture(scope="module")
def tiny_tts(tmp_path_factory) -> Path:
    return init_preset(tmp_path_factory.mktemp("tts") / "tts", "tiny-moshi-tts", 2)


@pytest.fixture(scope="module")
def two_stream_asr(tmp_path_factory) -> Path:
    """The tiny Moshi (its stream and a user stream) with the text 1 s behind: the user stream gets no token."""
    folder = init_preset(tmp_path_factory.mktemp("asr2") / "asr2", "tiny", 4)
    config = json.loads((folder / "config.json").read_text())
    config["delays"] = [12, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _sharpen(bundle) -> None:
    """Output heads scaled up: greedy choices with wide margins, and text that is not all padding."""
    with torch.no_grad():
        bundle.lm.text_linear.weight.mul_(12)
        for linear in bundle.lm.linears:
            linear.weight.mul_(12)


def test_mode_from_the_delays():
    assert DelayedMode.from_config(LMConfig.tiny_moshi_asr()).kind == "asr"
    assert DelayedMode.from_config(LMConfig.tiny_moshi_tts()).kind == "tts"
    assert DelayedMode.from_config(LMConfig.tiny()).kind is None  # Moshi's own delays
    assert DelayedMode.from_config(LMConfig.tiny_stt()) is None  # a family of its own
    assert DelayedMode.from_config(LMConfig.tiny_moshi_tts()).lag == 25
    assert delayed_mode(LMConfig.tiny_stt(), "asr", "x") is None
    with pytest.raises(ConfigError, match=r"'stt' model.*delays \[0, 0, 1\]"):
        delayed_mode(LMConfig.tiny(), "asr", "openmoshi transcribe")
    with pytest.raises(ConfigError, match="'tts' model.*audio late"):
        delayed_mode(LMConfig.tiny_moshi_asr(), "tts", "openmoshi speak")


def _record_steps(stt: DelayedTranscriber) -> list:
    """Wraps the transcriber's Generator.step to record what each step was given and returned."""
    calls = []
    step = stt.gen.step

    def recording(user, replace_audio=None):
        out = step(user, replace_audio=replace_audio)
        calls.append((replace_audio.clone(), out))
        return out

    stt.gen.step = recording
    return calls


@torch.no_grad()
@pytest.mark.parametrize("layout", ["tiny_asr", "two_stream_asr"])
def test_asr_steps_equal_the_reference_lmgen(layout, request, speech_files):
    """The text of each step == moshi 0.2.13's LMGen stepped with the same forced audio (depformer_replace_tokens)
    and, with a user stream, no token there."""
    pytest.importorskip("moshi")
    from moshi.models import loaders
    from moshi.models.lm import LMGen
    folder = request.getfixturevalue(layout)
    bundle = load_model(folder)
    cfg = bundle.config
    _sharpen(bundle)
    stt = DelayedTranscriber(bundle, batch_size=1)
    calls = _record_steps(stt)
    wav = read_speech(speech_files[0], 2.0)[None]
    with stt.streaming():
        steps = stt.feed(wav) + stt.flush()
    ref = loaders.get_moshi_lm(folder / "model.safetensors", lm_kwargs=kyutai_kwargs(cfg), dtype=torch.float32)
    ref.load_state_dict(bundle.lm.state_dict())
    gen = LMGen(ref, temp=0.0, temp_text=0.0)
    theirs = []
    with gen.streaming(1):
        for forced, _ in calls:
            user = torch.full((1, cfg.n_user, 1), -1, dtype=torch.long)
            out = gen.step(user, depformer_replace_tokens=forced[..., None])
            if out is not None:
                theirs.append(out[0, 0, 0].item())
    ours = [s.text[0].item() for s in steps]
    assert ours == theirs
    assert len(ours) == len(calls) - cfg.max_delay and len(set(ours)) > 3


@torch.no_grad()
def test_asr_streamed_text_equals_one_teacher_forced_pass(tiny_asr, speech_files):
    bundle = load_model(tiny_asr)
    _sharpen(bundle)
    stt = DelayedTranscriber(bundle, batch_size=2)
    codes = []
    encode = bundle.mimi.encode
    bundle.mimi.encode = lambda pcm: codes.append(encode(pcm)) or codes[-1]
    wavs = torch.stack([read_speech(speech_files[0], 1.5), read_speech(speech_files[1], 1.5)])
    with stt.streaming():
        steps = stt.feed(wavs) + stt.flush()
    text = torch.stack([s.text for s in steps], dim=1)  # [B, T]: text of frame t
    audio = torch.cat(codes, dim=-1)[:, :8, :text.shape[1]]
    out = bundle.lm(torch.cat([text[:, None], audio], dim=1))
    mask = out.text_mask[:, 0]
    assert mask.sum() == 2 * (text.shape[1] - 25)
    assert torch.equal(out.text_logits[:, 0].argmax(-1)[mask], text[mask])


@torch.no_grad()
def test_asr_any_chunking_and_batching_give_the_same_transcript(tiny_asr, speech_files):
    bundle = load_model(tiny_asr)
    _sharpen(bundle)
    wavs = [read_speech(speech_files[0], 1.4), read_speech(speech_files[1], 0.9)]
    batch = transcribe_recordings(bundle, wavs)
    alone = transcribe_recordings(bundle, wavs[1:])[0]
    assert batch[1].tokens[:len(alone.tokens)] == alone.tokens
    assert len(batch[0].tokens) == -(-wavs[0].shape[-1] // 1920) + 12  # the audio's frames + 1 s, aligned
    stt = transcriber(bundle)
    assert isinstance(stt, DelayedTranscriber)
    with stt.streaming():
        steps = []
        for start in range(0, wavs[0].shape[-1], 777):
            steps += stt.feed(wavs[0][None, :, start:start + 777])
        steps += stt.feed(torch.zeros(1, 1, -wavs[0].shape[-1] % 1920))
        steps += stt.flush()
    assert [s.text[0].item() for s in steps] == batch[0].tokens


def test_transcribe_command_on_a_moshi_asr_model(tiny_asr, speech_files, tmp_path, capsys):
    path = tmp_path / "in.wav"
    sf.write(path, read_speech(speech_files[0], 1.2)[0].numpy(), 24_000)
    out = tmp_path / "out"
    assert main(["transcribe", "--model", str(tiny_asr), str(path), "--out", str(out), "--format", "json,srt",
                 "--quiet", "--threads", "1"]) == 0
    want = transcribe_recordings(load_model(tiny_asr), [read_speech(path)])[0]
    data = json.loads((out / "in.json").read_text())
    assert data["tokens"] == want.tokens and data["text"] == want.text and (out / "in.srt").is_file()
    assert "in.wav" in capsys.readouterr().out
    assert main(["speak", "--model", str(tiny_asr), "hi", "--out", str(tmp_path / "x.wav"), "--quiet"]) == 1
    assert "audio late" in capsys.readouterr().err


def test_moshi_forcer_golden():
    """EPAD asks for a word (fed, its pieces follow); a piece asks too (the word starts at once); PAD waits."""
    t = TtsTokens(card=1001, new_word=0, pad=3)
    forcer = MoshiTextForcer(t, 0, max_padding=3, initial_padding=1)
    state = forcer.start([Word([10, 11], "hello"), Word([12], "you"), Word([13], "all")])
    sampled = [3, 0, 3, 3, 3, 50, 3, 3, 3, 3, 0, 3, 3]
    fed = [forcer.step(i, state, s) for i, s in enumerate(sampled)]
    # step 0: initial padding; 1: EPAD, "hello" next; 5: a piece: "you" now; 9: 3 PADs in a row force "all"
    assert fed == [3, 0, 10, 11, 3, 12, 3, 3, 3, 0, 13, 3, 3]
    assert state.transcript == [("hello", 2), ("you", 5), ("all", 10)]
    assert state.end_step is None
    assert forcer.step(13, state, 40) == 3 and state.end_step == 13  # a word past the last one: the end


def _reference_tts_frames(bundle, tts_dir: Path, words: list[Word], steps: int) -> torch.Tensor:
    """moshi 0.2.13's LMGen, greedy, with our forcer in its text hook and no depth pass while audio is initial."""
    from moshi.models import loaders
    from moshi.models.lm import LMGen
    ref = loaders.get_moshi_lm(tts_dir / "model.safetensors", lm_kwargs=kyutai_kwargs(bundle.config),
                               dtype=torch.float32)
    ref.load_state_dict(bundle.lm.state_dict())
    forcer = MoshiTextForcer(TtsTokens(1001, new_word=0, pad=3))
    state = forcer.start(words)
    step = 0

    def on_text(token: torch.Tensor) -> None:
        token[0] = forcer.step(step, state, token[0].item())

    gen = LMGen(ref, temp=0.0, temp_text=0.0, on_text_hook=on_text)
    frames = []
    with gen.streaming(1):
        for step in range(steps):
            silent = torch.full((1, 8, 1), -1, dtype=torch.long) if step < 25 else None
            out = gen.step(torch.zeros(1, 0, 1, dtype=torch.long), depformer_replace_tokens=silent)
            if out is not None:
                frames.append(out)
    return torch.cat(frames, dim=2)


@torch.no_grad()
def test_tts_frames_equal_the_reference_lmgen_and_one_teacher_forced_pass(tiny_tts):
    pytest.importorskip("moshi")
    bundle = load_model(tiny_tts)
    _sharpen(bundle)
    synth = DelayedSynthesizer(bundle, temp=0.0)
    text = "Hello there, how are you? I wanted to ask you about your plans for the weekend and the week after."
    words = synth.words(text)
    run = synth.generate([words])
    assert run.end_steps[0] is not None and [w for w, _ in run.transcripts[0]] == [w.text for w in words]
    frames = run.frames
    assert frames.shape[-1] == run.end_steps[0] + synth.final_padding
    theirs = _reference_tts_frames(bundle, tiny_tts, synth.words(text), 26 + frames.shape[-1])
    assert torch.equal(frames, theirs)
    # streamed == offline: every sampled audio code is the argmax of one teacher-forced pass over the frames (up to
    # the last 26, whose audio would see text past the end)
    out = bundle.lm(frames)
    n = frames.shape[-1] - 26
    assert n > 15 and out.audio_mask[:, :, :n].all()
    assert torch.equal(out.audio_logits[:, :, :n].argmax(-1), frames[:, 1:, :n])


def test_speak_command_on_a_moshi_tts_model(tiny_tts, tmp_path, capsys):
    out = tmp_path / "hello.wav"
    args = ["speak", "--model", str(tiny_tts), "Hello there, how are you?", "--out", str(out), "--quiet",
            "--threads", "1", "--seed", "3", "--max-seconds", "20"]
    assert main(args) == 0
    info = sf.info(out)
    timings = json.loads(out.with_suffix(".json").read_text())
    speech = DelayedSynthesizer(load_model(tiny_tts), seed=3).speak(["Hello there, how are you?"])[0]
    assert timings["finished"] == speech.finished
    assert [(w["word"], w["start"], w["end"]) for w in timings["words"]] == \
        [(w.word, w.start, w.end) for w in speech.words]
    assert info.samplerate == 24_000 and info.frames == speech.audio.shape[-1]
    if speech.finished:
        assert [w.word for w in speech.words] == ["Hello", "there,", "how", "are", "you?"]
        assert speech.words[-1].end <= info.duration + 1e-3
    assert "wrote" in capsys.readouterr().out
    for extra, message in ((["--voice", str(out)], "own voice"), (["--cfg-coef", "2"], "--cfg-coef")):
        assert main([*args, *extra]) == 1
        assert message in capsys.readouterr().err
    assert main(["transcribe", "--model", str(tiny_tts), str(out), "--quiet"]) == 1
    assert "text late" in capsys.readouterr().err
