"""Speech translation (Kyutai's Hibiki): equal to moshi 0.2.13 fed as its run_inference feeds Hibiki; the
`translate` command end to end."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import soundfile as sf
import torch
from conftest import init_preset, read_speech
from lm_utils import FILE_KEYS

from openmoshi.bundle import load_model
from openmoshi.cli.main import main
from openmoshi.generation.translate import translate_recordings

moshi = pytest.importorskip("moshi")
from moshi.conditioners import ConditionAttributes
from moshi.models import loaders
from moshi.models.lm import LMGen


# tiny models run fastest on one thread
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_hibiki(tmp_path_factory) -> Path:
    return init_preset(tmp_path_factory.mktemp("hibiki") / "tiny-hibiki", "tiny-hibiki", 2)


@pytest.mark.parametrize("cfg_coef", [1.0, 3.0])
@torch.no_grad()
def test_translation_equals_the_reference_pipeline(tiny_hibiki, speech_files, cfg_coef):
    bundle = load_model(tiny_hibiki)
    config = json.loads((tiny_hibiki / "config.json").read_text())
    wav = read_speech(speech_files[2], 0.8)
    extra = 0.4
    ours = translate_recordings(bundle, [wav], cfg_coef, generation={"temp": 0, "temp_text": 0}, max_extra_s=extra)[0]

    lm_kwargs = {k: v for k, v in copy.deepcopy(bundle.config.to_kyutai()).items() if k not in FILE_KEYS}
    ref = loaders.get_moshi_lm(tiny_hibiki / "model.safetensors", lm_kwargs=lm_kwargs, dtype=torch.float32)
    ref.text_emb.weight.data[2] = ref.text_emb.weight.data[3]  # CheckpointInfo.get_moshi does this for Hibiki
    mimi = loaders.get_mimi(tiny_hibiki / config["mimi_name"],
                            json.loads((tiny_hibiki / "mimi_config.json").read_text()), num_codebooks=8)
    attrs = [ConditionAttributes(text={"description": "very_good"}, tensor={})]
    if cfg_coef != 1.0:
        attrs.append(ConditionAttributes(text={"description": "very_bad"}, tensor={}))
    gen = LMGen(ref, use_sampling=False, cfg_coef=cfg_coef,
                condition_tensors=ref.condition_provider.prepare_and_provide(attrs))
    frames = wav.shape[-1] // 1920
    tokens, pcm = [], []
    with mimi.streaming(1), gen.streaming(1):
        for index in range(frames + 1 + int(extra * 12.5)):
            if index < frames:
                codes = mimi.encode(wav[None, :, index * 1920:(index + 1) * 1920])
            elif index == frames:
                codes = torch.full((1, 8, 1), 2048, dtype=torch.long)
            else:
                codes = mimi.encode(torch.zeros(1, 1, 1920))
            if index == 0:
                gen.step(codes)
            out = gen.step(codes)
            if out is not None:
                tokens.append(out[0, 0, 0].item())
                pcm.append(mimi.decode(out[:, 1:]))
    assert ours.transcript.tokens == tokens
    theirs = torch.cat(pcm, dim=-1)[0]
    assert ours.audio.shape == theirs.shape
    assert (ours.audio - theirs).abs().max() < 1e-4 * max(theirs.abs().max().item(), 1e-3) + 1e-6
    assert not ours.finished  # random weights never write the end of text


def test_translate_command(tiny_hibiki, speech_files, tmp_path, capsys):
    source = tmp_path / "source.wav"
    sf.write(source, read_speech(speech_files[0], 0.6)[0].numpy(), 24_000)
    out = tmp_path / "out.wav"
    args = ["translate", "--model", str(tiny_hibiki), str(source), "--out", str(out), "--max-extra-seconds", "0.3",
            "--quiet", "--threads", "1", "--seed", "1"]
    assert main(args) == 0
    info = sf.info(out)
    assert info.samplerate == 24_000 and abs(info.duration - (0.56 + 0.08 + 0.24)) < 0.09
    data = json.loads(out.with_suffix(".json").read_text())
    assert len(data["tokens"]) == round(info.duration * 12.5) and data["finished"] is False
    assert "source.wav" in capsys.readouterr().out
    stt = tmp_path / "stt"
    assert main(["init", "--preset", "tiny-stt", str(stt)]) == 0
    assert main(["translate", "--model", str(stt), str(source), "--out", str(out), "--quiet"]) == 1
    assert "hibiki" in capsys.readouterr().err
