"""Speech-to-text (Kyutai's `stt` family): parity with moshi 0.2.13, streaming, timed words, `transcribe`."""

from __future__ import annotations

import json
import typing as tp
from pathlib import Path

import pytest
import soundfile as sf
import torch
from conftest import init_preset, read_speech
from lm_utils import kyutai_kwargs, sharp_model, small_config

from openmoshi.bundle import init_model, load_model
from openmoshi.checkpoint import normalize_keys
from openmoshi.cli.main import main
from openmoshi.errors import ConfigError
from openmoshi.generation.generator import Generator
from openmoshi.generation.stt import (
    EndOfSpeech,
    StreamingTranscriber,
    transcribe_recordings,
    words_from_tokens,
)
from openmoshi.lm.config import LMConfig
from openmoshi.lm.families import SttSettings
from openmoshi.lm.model import LMModel

# kyutai/stt-2.6b-en's config.json (public), as its loader reads it
STT_2_6B = {"card": 2048, "n_q": 32, "dep_q": 0, "delays": [0] * 33, "dim": 2048, "text_card": 4000,
            "existing_text_padding_id": 3, "num_heads": 32, "num_layers": 48, "hidden_scale": 4.125, "causal": True,
            "layer_scale": None, "context": 375, "max_period": 100000.0, "gating": "silu", "norm": "rms_norm_f32",
            "positional_embedding": "rope", "depformer_dim": 1024, "depformer_num_heads": 16,
            "depformer_num_layers": 6, "depformer_dim_feedforward": None, "depformer_multi_linear": True,
            "depformer_pos_emb": "none", "depformer_weights_per_step": True, "conditioners": {},
            "cross_attention": False, "model_id": {"sig": "dabcc802", "epoch": 50},
            "lm_gen_config": {"temp": 0.0, "temp_text": 0.0, "top_k": 250, "top_k_text": 50},
            "stt_config": {"audio_delay_seconds": 2.5, "audio_silence_prefix_seconds": 1.0}, "model_type": "stt",
            "mimi_name": "mimi-pytorch-e351c8d8@125.safetensors", "tokenizer_name": "tokenizer_en_audio_4000.model"}


# tiny models run fastest on one thread
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_stt(tmp_path_factory) -> Path:
    return init_preset(tmp_path_factory.mktemp("stt") / "tiny-stt", "tiny-stt", 3)


def stt_config(**changes) -> LMConfig:
    """stt-1b's structure (32 audio streams in, no depth transformer, 4 extra heads) at toy size."""
    base = {"n_q": 32, "dep_q": 0, "delays": [0] * 33, "extra_heads_num_heads": 4, "extra_heads_dim": 6,
            "model_type": "stt", "max_period": 100_000.0,
            "stt_config": {"audio_delay_seconds": 0.5, "audio_silence_prefix_seconds": 0.0}}
    base.update(changes)
    return small_config(**base)


def test_configs_of_the_released_models():
    cfg = LMConfig.from_kyutai(STT_2_6B)
    assert (cfg.model_type, cfg.n_q, cfg.dep_q, cfg.text_card) == ("stt", 32, 0, 4000)
    assert SttSettings.from_config(cfg) == SttSettings(audio_delay_s=2.5, silence_prefix_s=1.0)
    assert SttSettings.from_config(cfg).text_offset_s == 3.5
    assert LMConfig.from_kyutai(LMConfig.stt_1b().to_kyutai()) == LMConfig.stt_1b()
    moshi = pytest.importorskip("moshi")
    del moshi
    from moshi.models.lm import LMModel as RefLM
    for cfg in (LMConfig.stt_1b(), LMConfig.from_kyutai(STT_2_6B)):
        with torch.device("meta"):
            ours, ref = LMModel(cfg), RefLM(**kyutai_kwargs(cfg))
        ref_shapes = {k: tuple(v.shape) for k, v in normalize_keys(ref.state_dict()).items()}
        assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == ref_shapes
    with torch.device("meta"):
        assert LMModel(LMConfig.stt_1b()).extra_heads[3].weight.shape == (6, 2048)


@pytest.mark.parametrize("bad", [{"audio_delay_seconds": -1}, {"audio_silence_prefix_seconds": "1s"},
                                 {"audio_delay_seconds": float("nan")}])
def test_bad_stt_config_is_a_clear_error(bad):
    with pytest.raises(ConfigError, match="stt_config"):
        SttSettings.from_config(stt_config(stt_config=bad))


def _ref_steps(ref, user: torch.Tensor, steps: int):
    """Kyutai's LMGen with extra heads, first frame fed twice as moshi.run_inference does."""
    from moshi.models.lm import LMGen
    logits: list[torch.Tensor] = []
    gen = LMGen(ref, use_sampling=False, on_text_logits_hook=lambda x: logits.append(x[:, 0, 0].clone()))
    tokens, heads = [], []
    with gen.streaming(user.shape[0]):
        gen.step(user[:, :, :1])
        logits.clear()
        for s in range(steps):
            out, extra = gen.step_with_extra_heads(user[:, :, s:s + 1])
            tokens.append(out[:, 0, 0])
            heads.append(torch.stack([h[:, 0] for h in extra], dim=1))
    return torch.stack(tokens, 1), torch.stack(heads, 1), torch.stack(logits, 1)


def _our_steps(lm: LMModel, user: torch.Tensor, steps: int):
    logits: list[torch.Tensor] = []
    gen = Generator(lm, temp=0, temp_text=0, text_logits_hook=lambda x: logits.append(x.clone()))
    tokens, heads = [], []
    with gen.streaming(user.shape[0]):
        first = gen.step(user[:, :, :1])[:, 0, 0]
        logits.clear()
        for s in range(steps):
            tokens.append(gen.step(user[:, :, s:s + 1])[:, 0, 0])
            heads.append(torch.stack(gen.extra_heads(), dim=1))
    _our_steps.first = first
    return torch.stack(tokens, 1), torch.stack(heads, 1), torch.stack(logits, 1)


@torch.no_grad()
def test_streaming_parity_with_reference_tokens_logits_and_extra_heads():
    pytest.importorskip("moshi")
    from moshi.models.lm import LMModel as RefLM
    cfg = stt_config()
    lm = sharp_model(cfg)
    with torch.no_grad():
        for head in lm.extra_heads:
            head.weight.mul_(8)  # confident heads: probabilities far from uniform
    ref = RefLM(**kyutai_kwargs(cfg)).eval()
    ref.load_state_dict(lm.state_dict())
    steps, batch = 60, 3  # past the context of 40 steps
    user = torch.randint(0, cfg.card, (batch, cfg.n_q, steps), generator=torch.Generator().manual_seed(4))
    ours, theirs = _our_steps(lm, user, steps), _ref_steps(ref, user, steps)
    assert torch.equal(ours[0], theirs[0])
    assert len(ours[0].unique()) > 10 and not torch.equal(ours[0][0], ours[0][1])
    for a, b in [(ours[2], theirs[2]), (ours[1], theirs[1])]:
        assert a.shape == b.shape
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-4
    assert ours[1].shape == (batch, steps, 4, 6) and ours[1].max() > 0.9  # sharp, real distributions


@torch.no_grad()
def test_streamed_steps_equal_one_teacher_forced_pass():
    cfg = stt_config()
    lm = sharp_model(cfg)
    steps, batch = 30, 2
    user = torch.randint(0, cfg.card, (batch, cfg.n_q, steps), generator=torch.Generator().manual_seed(6))
    tokens, heads, logits = _our_steps(lm, user, steps)
    # after the initial tokens (the doubled first step), step s read the text of step s - 1 (the first
    # step's for s = 0) beside audio frame s: one teacher-forced pass over that grid
    text_in = torch.cat([_our_steps.first[:, None], tokens[:, :-1]], dim=1)
    grid = torch.cat([lm.initial_tokens(batch), torch.cat([text_in[:, None], user], dim=1)], dim=2)
    hidden, offline = lm.forward_text(grid)
    hidden, offline = hidden[:, 1:], offline[:, 0, 1:]
    assert ((offline - logits).abs().max() / logits.abs().max()).item() < 1e-4
    assert torch.equal(offline.argmax(-1), tokens)
    offline_heads = torch.stack(lm.extra_head_probs(hidden), dim=2)
    assert (offline_heads - heads).abs().max() < 1e-5


@torch.no_grad()
def test_end_to_end_tokens_equal_the_reference_pipeline(tiny_stt, speech_files):
    """Our transcription of real speech == Kyutai's Mimi + LMGen fed as moshi.run_inference feeds stt models."""
    pytest.importorskip("moshi")
    from moshi.models import loaders
    from moshi.models.lm import LMGen
    config = json.loads((tiny_stt / "config.json").read_text())
    bundle = load_model(tiny_stt)
    wav = read_speech(speech_files[0], 1.2)
    ours = transcribe_recordings(bundle, [wav])[0]
    mimi = loaders.get_mimi(tiny_stt / config["mimi_name"], json.loads((tiny_stt / "mimi_config.json").read_text()),
                            num_codebooks=32)
    ref = loaders.get_moshi_lm(tiny_stt / "model.safetensors", lm_kwargs=kyutai_kwargs(bundle.config),
                               dtype=torch.float32)
    gen = LMGen(ref, **config["lm_gen_config"])
    stt = config["stt_config"]
    pcm = torch.nn.functional.pad(wav[None], (int(stt["audio_silence_prefix_seconds"] * 24000),
                                              int((stt["audio_delay_seconds"] + 1.0) * 24000)))
    tokens, heads = [], []
    with mimi.streaming(1), gen.streaming(1):
        for i, chunk in enumerate(pcm.split(1920, dim=2)):
            if chunk.shape[-1] < 1920:
                break
            codes = mimi.encode(chunk)
            if i == 0:
                gen.step(codes)
            out, extra = gen.step_with_extra_heads(codes)
            tokens.append(out[0, 0, 0].item())
            heads.append(torch.stack([h[0, 0] for h in extra]))
    assert ours.tokens == tokens
    assert len(tokens) == -(-int(1.2 * 24000) // 1920) + int(1.5 * 12.5)


@torch.no_grad()
def test_any_chunking_gives_the_offline_transcript(tiny_stt, speech_files):
    bundle = load_model(tiny_stt)
    wavs = [read_speech(speech_files[0], 1.0), read_speech(speech_files[1], 0.7)]
    offline = transcribe_recordings(bundle, wavs)
    # the second alone gives the same tokens as in the batch
    alone = transcribe_recordings(bundle, wavs[1:])[0]
    n = len(alone.tokens)
    assert offline[1].tokens[:n] == alone.tokens
    stt = StreamingTranscriber(bundle, batch_size=1)
    batch = wavs[0][None]
    with stt.streaming():
        steps = stt.start()
        for start in range(0, batch.shape[-1], 777):  # chunks that straddle frames
            steps += stt.feed(batch[..., start:start + 777])
        steps += stt.feed(torch.zeros(1, 1, -batch.shape[-1] % 1920))
        steps += stt.flush()
    tokens = [s.text[0].item() for s in steps]
    assert tokens == offline[0].tokens
    assert all(len(s.heads) == 4 and s.heads[0].shape == (1, 6) for s in steps)
    with pytest.raises(Exception, match="shape"), stt.streaming():
        stt.feed(torch.zeros(2, 1, 100))


class _Pieces:
    """A tokenizer stand-in with fixed pieces (▁ marks a word start), as SentencePiece answers."""

    pieces: tp.ClassVar[dict[int, str]] = {0: "<epad>", 3: "<pad>", 10: "▁hel", 11: "lo", 12: "▁you", 13: "▁all", 14: "right"}

    def get_piece_size(self) -> int:
        return 20

    def is_control(self, token: int) -> bool:
        return token in (0, 3)

    def id_to_piece(self, token: int) -> str:
        return self.pieces.get(token, "?")

    def decode(self, tokens: list[int]) -> str:
        return "".join(self.pieces[t] for t in tokens).replace("▁", " ")


def test_timed_words_golden():
    # frame:   0  1  2   3   4  5  6   7  8   9   10  11
    tokens = [3, 3, 0, 10, 11, 3, 0, 12, 3, 13, 14, 3] + [3] * 20
    words = words_from_tokens(tokens, _Pieces(), frame_rate=12.5, offset_s=0.08, duration=5.0)
    got = [(w.word, w.start, w.end) for w in words]
    # hello: pieces at 3-4, ends at the next EPAD (6); you: 7, ends where "all" starts (9);
    # allright: 9-10, no EPAD after it: ends 1 s after its last piece at most
    assert got == [("hello", 0.16, 0.4), ("you", 0.48, 0.64), ("allright", 0.64, 1.76)]
    clipped = words_from_tokens(tokens, _Pieces(), frame_rate=12.5, offset_s=0.5, duration=0.3)
    assert [(w.start, w.end) for w in clipped] == [(0.0, 0.0), (0.06, 0.22), (0.22, 0.3)]


def test_end_of_speech_fires_once_after_speech():
    eos = EndOfSpeech(batch_size=2, head=2, threshold=0.6)
    fired = []
    texts = [[3, 3], [10, 3], [3, 3], [3, 3], [3, 12], [3, 3]]
    done_prob = [[0.9, 0.9], [0.1, 0.9], [0.7, 0.9], [0.8, 0.2], [0.9, 0.1], [0.9, 0.95]]
    for text, prob in zip(texts, done_prob):
        head = torch.zeros(2, 6)
        head[:, 0] = torch.tensor(prob)
        heads = [torch.zeros(2, 6), torch.zeros(2, 6), head, torch.zeros(2, 6)]
        fired.append(eos.update(torch.tensor(text), heads).tolist())
    # item 0: silence before speech never fires; after "hel" the head rises at step 2 -> fires once
    # item 1: speaks at step 4, head high at step 5 -> fires
    assert fired == [[False, False], [False, False], [True, False], [False, False], [False, False], [False, True]]


def test_transcribe_command_formats_and_batches(tiny_stt, speech_files, tmp_path, capsys):
    inputs = []
    for i, seconds in enumerate((1.0, 0.6)):
        path = tmp_path / f"in{i}.wav"
        sf.write(path, read_speech(speech_files[i], seconds)[0].numpy(), 24_000)
        inputs.append(path)
    out = tmp_path / "out"
    args = ["transcribe", "--model", str(tiny_stt), *map(str, inputs), "--out", str(out), "--batch-size", "2",
            "--format", "txt,json,srt,vtt", "--quiet", "--threads", "1"]
    assert main(args) == 0
    bundle = load_model(tiny_stt)
    expected = transcribe_recordings(bundle, [read_speech(p) for p in inputs])
    for path, want in zip(inputs, expected):
        data = json.loads((out / f"{path.stem}.json").read_text())
        assert data["tokens"] == want.tokens and data["text"] == want.text
        assert (out / f"{path.stem}.txt").read_text().strip() == want.text.strip()
        srt = (out / f"{path.stem}.srt").read_text()
        vtt = (out / f"{path.stem}.vtt").read_text()
        assert vtt.startswith("WEBVTT")
        if want.words:
            assert srt.startswith("1\n00:00:") and " --> " in srt and want.words[0].word in srt
            assert "." in vtt.split("-->")[0]
    printed = capsys.readouterr().out
    assert "in0.wav" in printed and "in1.wav" in printed


def test_transcribe_command_errors(tiny_stt, tmp_path, capsys):
    moshi = init_model("tiny", tmp_path / "moshi", seed=0)
    empty = tmp_path / "x.wav"
    sf.write(empty, torch.zeros(2400).numpy(), 24_000)
    assert main(["transcribe", "--model", str(moshi), str(empty), "--quiet"]) == 1
    assert "stt" in capsys.readouterr().err
    assert main(["transcribe", "--model", str(tiny_stt), str(tmp_path / "missing.wav"), "--quiet"]) == 1
    assert "missing.wav" in capsys.readouterr().out
    assert main(["transcribe", "--model", str(tiny_stt), str(empty), "--format", "doc", "--quiet"]) == 1
    assert "--format" in capsys.readouterr().err
