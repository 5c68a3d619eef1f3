"""Text to speech (Kyutai's `tts` family): the forcing state machine on golden scripts, generation equal to
moshi 0.2.13's TTSModel, voices, and `openmoshi speak` end to end."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import soundfile as sf
import torch
from conftest import init_preset
from lm_utils import FILE_KEYS

from openmoshi.bundle import load_model
from openmoshi.checkpoint import save_safetensors
from openmoshi.cli.main import main
from openmoshi.generation.tts import (
    Synthesizer,
    TextForcer,
    TtsTokens,
    Word,
    script_to_words,
    voice_condition,
)

moshi = pytest.importorskip("moshi")
from moshi.conditioners import ConditionAttributes, TensorCondition
from moshi.models import loaders
from moshi.models import tts as ref_tts


# tiny models run fastest on one thread
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_tts(tmp_path_factory) -> Path:
    return init_preset(tmp_path_factory.mktemp("tts") / "tiny-tts", "tiny-tts", 5)


def test_forcing_golden_script():
    # one word of two pieces, then one of one piece; initial padding 2, max padding 3, no second stream
    forcer = TextForcer(TtsTokens(card=101), second_stream_ahead=0, max_padding=3, initial_padding=2)
    state = forcer.start([Word([40, 41], "hello"), Word([], "", padding=2), Word([50], "you")])
    sampled = [0, 0, 0, 3, 0, 3, 3, 0, 3, 3, 3, 3, 0, 3]
    fed = [forcer.step(s, state, tok) for s, tok in enumerate(sampled)]
    # 0, 1: the initial forced pads; 2: WORD -> "hello" queued (fed: WORD); 3, 4: its pieces (the model's WORD
    # at 4 is ignored); 5: pad, which spends the last allowed padding; 6: a word is due -> the pause, which
    # forces 2 pads (6, 7); 8: WORD -> "you"; 9: its piece; 10, 11: pads; 12: a word is due past the last one
    # -> the end (end_step 12), padding from then on
    assert fed == [3, 3, 0, 40, 41, 3, 3, 3, 0, 50, 3, 3, 3, 3]
    assert state.transcript == [("hello", 2), ("you", 8)] and state.end_step == 12


@pytest.mark.parametrize("ahead,max_padding,initial", [(0, 8, 2), (2, 8, 2), (1, 3, 0), (2, 5, 4)])
def test_forcing_equals_the_reference_machine(ahead, max_padding, initial):
    rng = random.Random(ahead * 100 + max_padding)
    tokens = TtsTokens(card=1001)
    ref_machine = ref_tts.StateMachine(ref_tts.TokenIds(1001), second_stream_ahead=ahead, max_padding=max_padding,
                                       initial_padding=initial)
    forcer = TextForcer(tokens, ahead, max_padding, initial)
    for trial in range(20):
        words = []
        for _ in range(rng.randint(0, 8)):
            if rng.random() < 0.15:
                words.append(Word([], "", padding=rng.randint(0, 4)))
            else:
                pieces = [rng.randint(4, 999) for _ in range(rng.randint(1, 4))]
                words.append(Word(pieces, f"w{len(words)}", padding=rng.randint(0, 2)))
        ours = forcer.start(copy.deepcopy(words))
        theirs = ref_machine.new_state([ref_tts.Entry(list(w.tokens), w.text, w.padding) for w in words])
        for step in range(60):
            token = rng.choice([0, 3, 3, 3, 7, 1])
            ref_out, _ = ref_machine.process(step, theirs, token)
            assert forcer.step(step, ours, token) == ref_out, (trial, step)
        assert ours.transcript == theirs.transcript and ours.end_step == theirs.end_step


def test_script_words_equal_the_reference_entries(tiny_tts):
    bundle = load_model(tiny_tts)
    turns = ["Hello: there (my) friend’s dog.", "", 'Yes <break time="0.4s"/> indeed  it is.']
    tokens = TtsTokens(1001)
    for multi, between in [(True, 1), (False, 0)]:
        ours = script_to_words(bundle.tokenizer, tokens, 12.5, turns, multi, between)
        theirs = ref_tts.script_to_entries(bundle.tokenizer, ref_tts.TokenIds(1001), 12.5, turns, multi, between)
        assert [(w.tokens, w.text, w.padding) for w in ours] == [(e.tokens, e.text, e.padding) for e in theirs]
        assert any(not w.tokens and w.padding == 5 for w in ours)  # the break


def _reference_tts(folder: Path, bundle, **kwargs):
    cfg = bundle.config
    lm_kwargs = {k: v for k, v in copy.deepcopy(cfg.to_kyutai()).items() if k not in FILE_KEYS}
    lm = loaders.get_moshi_lm(folder / "model.safetensors", lm_kwargs=lm_kwargs, dtype=torch.float32)
    machine = ref_tts.StateMachine(ref_tts.TokenIds(cfg.text_card + 1), second_stream_ahead=2, max_padding=8,
                                   initial_padding=2)
    class _Rate:  # generate() reads only the frame rate of the codec
        frame_rate = 12.5

    return ref_tts.TTSModel(lm=lm, mimi=_Rate(), tokenizer=bundle.tokenizer, voice_suffix="", voice_repo="",
                            machine=machine, delay_steps=int(cfg.tts_config["audio_delay"] * 12.5), n_q=cfg.n_q,
                            **kwargs)


@pytest.mark.parametrize("cfg_coef,bonus", [(2.0, 0.0), (1.5, 2.0)])
@torch.no_grad()
def test_generation_equals_reference_tts_model(tiny_tts, cfg_coef, bonus):
    """Greedy, distilled guidance as a condition (cfg_coef 2.0) and a padding bonus: frames, words, ends equal."""
    bundle = load_model(tiny_tts)
    with torch.no_grad():  # a confident model: greedy choices far apart
        bundle.lm.text_linear.weight.mul_(10)
        for linear in bundle.lm.linears:
            linear.weight.mul_(10)
    folder = tiny_tts.parent / f"sharp-{cfg_coef}"
    from openmoshi.lm.loading import save_lm
    save_lm(bundle.lm, folder)
    synth = Synthesizer(bundle, temp=0.0, cfg_coef=cfg_coef, padding_bonus=bonus, max_steps=80)
    texts = [["Hello there, my friend."], ["Yes", "indeed it is."]]
    scripts = [synth.words(t) for t in texts]
    g = torch.Generator().manual_seed(0)
    voices = [voice_condition(torch.randn(1, 32, 6, generator=g)) for _ in texts]
    ours = synth.generate(scripts, voices)
    ref = _reference_tts(folder, bundle, temp=0.0, padding_bonus=bonus, max_gen_length=80)
    entries = [ref.prepare_script(t, padding_between=1) for t in texts]
    attrs = [ConditionAttributes(text={"control": "ok", "cfg": format(cfg_coef, ".1f")},
                                 tensor={"speaker_wavs": TensorCondition(v.tensor, v.mask)}) for v in voices]
    theirs = ref.generate(entries, attrs)
    assert torch.equal(ours.frames, torch.cat(theirs.frames, dim=2))
    assert ours.end_steps == theirs.end_steps and all(e is not None for e in ours.end_steps)
    assert ours.transcripts == theirs.all_transcripts
    assert [w for w, _ in ours.transcripts[0]] == ["Hello", "there,", "my", "friend."]


@torch.no_grad()
def test_cfg_null_branch_and_audio_prompt_equal_reference(tiny_tts):
    """Guidance run as a null branch (model not distilled) with an audio prompt as the voice."""
    bundle = load_model(tiny_tts)
    synth = Synthesizer(bundle, temp=0.0, cfg_coef=3.0, max_steps=50)
    synth.distilled_cfg = []  # as a model not distilled for guidance: a null branch runs
    g = torch.Generator().manual_seed(1)
    prefix = torch.cat([torch.full((1, 5), -1), torch.randint(0, 2048, (8, 5), generator=g)])
    voice = voice_condition(torch.randn(1, 32, 4, generator=g))
    ours = synth.generate([synth.words("Good morning to you.")], [voice], prefixes=[prefix])
    ref = _reference_tts(tiny_tts, bundle, temp=0.0, cfg_coef=3.0, max_gen_length=50)
    ref.__dict__["valid_cfg_conditionings"] = set()
    attrs = [ConditionAttributes(text={"control": "ok", "cfg": None},
                                 tensor={"speaker_wavs": TensorCondition(voice.tensor, voice.mask)})]
    theirs = ref.generate([ref.prepare_script(["Good morning to you."], padding_between=1)], attrs,
                          prefixes=[prefix])
    assert torch.equal(ours.frames, torch.cat(theirs.frames, dim=2))
    assert ours.transcripts == theirs.all_transcripts
    # the prompt's codes are the first audio frames
    assert torch.equal(ours.frames[0, 1:, 4:9], prefix[1:])


def test_speak_command(tiny_tts, tmp_path, capsys):
    voice = tmp_path / "voice.safetensors"
    save_safetensors({"speaker_wavs": torch.randn(1, 32, 5)}, voice)
    out = tmp_path / "hello.wav"
    args = ["speak", "--model", str(tiny_tts), "--voice", str(voice), "Hello there, how are you?", "--out", str(out),
            "--quiet", "--threads", "1", "--seed", "3", "--max-seconds", "10"]
    assert main(args) == 0
    info = sf.info(out)
    assert info.samplerate == 24_000 and info.channels == 1 and info.duration > 0.5
    timings = json.loads(out.with_suffix(".json").read_text())
    assert [w["word"] for w in timings["words"]] == ["Hello", "there,", "how", "are", "you?"]
    starts = [w["start"] for w in timings["words"]]
    assert starts == sorted(starts) and timings["words"][-1]["end"] <= info.duration + 1e-3
    assert "wrote" in capsys.readouterr().out
    text_file = tmp_path / "script.txt"
    text_file.write_text("First turn here.\n\nSecond turn.")
    assert main(["speak", "--model", str(tiny_tts), "--voice", str(voice), "--text-file", str(text_file),
                 "--out", str(tmp_path / "two.wav"), "--quiet", "--threads", "1", "--max-seconds", "10"]) == 0


def test_speak_errors(tiny_tts, tmp_path, capsys):
    out = str(tmp_path / "x.wav")
    assert main(["speak", "--model", str(tiny_tts), "hi", "--out", out, "--quiet"]) == 1
    assert "needs a voice" in capsys.readouterr().err
    assert main(["speak", "--model", str(tiny_tts), "--out", out, "--quiet"]) == 1
    assert "--text-file" in capsys.readouterr().err
    voice = tmp_path / "v.safetensors"
    save_safetensors({"speaker_wavs": torch.randn(1, 32, 5)}, voice)
    assert main(["speak", "--model", str(tiny_tts), "--voice", str(voice), "hi", "--out", out, "--cfg-coef", "2.2",
                 "--quiet"]) == 1
    assert "distilled" in capsys.readouterr().err
