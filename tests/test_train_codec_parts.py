"""Codec training parts: discriminator shapes, losses and balancer against hand-computed values, the quantizer's
training draws, teacher pooling alignment, weight-norm export round trip."""

from __future__ import annotations

import math

import pytest
import torch

from openmoshi.codec import Mimi, load_mimi
from openmoshi.data.audio_clips import AudioClips
from openmoshi.train.codec.config import CodecModelConfig
from openmoshi.train.codec.discriminator import DiscriminatorConfig, MultiScaleSTFTDiscriminator
from openmoshi.train.codec.losses import Balancer, feature_matching, hinge_discriminator, hinge_generator
from openmoshi.train.codec.model import TrainableMimi, apply_weight_norm, export_mimi, fold_weight_norm
from openmoshi.train.codec.task import step_generator
from openmoshi.train.codec.teacher import SemanticTeacher, pool_to_frames
from openmoshi.data.order import ItemRequest

from mimi_utils import fill_codebooks


def test_discriminator_shapes():
    cfg = DiscriminatorConfig(filters=4, n_ffts=[256, 128])
    disc = MultiScaleSTFTDiscriminator(cfg)
    wav = torch.randn(2, 1, 4800)
    logits, feats = disc(wav)
    assert len(logits) == len(feats) == 2
    for n_fft, lg, ft in zip(cfg.n_ffts, logits, feats):
        frames = (4800 - n_fft) // (n_fft // 4) + 1
        bins = n_fft // 2 + 1
        for _ in cfg.dilations:  # three stride-2 convs along frequency
            bins = math.ceil(bins / 2)
        assert lg.shape == (2, 1, frames, bins)
        assert len(ft) == 2 + len(cfg.dilations) and all(f.shape[:2] == (2, 4) for f in ft)
        assert ft[-1].shape[2:] == (frames, bins)
    # Default = the paper's: 32 filters, five scales, weight norm on every conv
    full = MultiScaleSTFTDiscriminator()
    assert [s.n_fft for s in full.scales] == [1024, 2048, 512, 256, 128]
    assert [s.hop for s in full.scales] == [256, 512, 128, 64, 32]
    assert all(hasattr(c, "parametrizations") for s in full.scales for c in [*s.convs, s.post])


def test_hinge_and_feature_matching_by_hand():
    real = [torch.tensor([0.5, 2.0]), torch.tensor([-1.0])]
    fake = [torch.tensor([-2.0, 0.0]), torch.tensor([0.5])]
    # scale 1: mean(relu(1 - [0.5, 2])) = 0.25, mean(relu(1 + [-2, 0])) = 0.5; scale 2: relu(2) = 2, relu(1.5) = 1.5
    assert hinge_discriminator(real, fake).item() == pytest.approx((0.25 + 0.5 + 2.0 + 1.5) / 2)
    assert hinge_generator(fake).item() == pytest.approx((1.0 + -0.5) / 2)
    fr = [[torch.tensor([1.0, 2.0]), torch.tensor([0.0])], [torch.tensor([3.0])]]
    ff = [[torch.tensor([2.0, 2.0]), torch.tensor([-1.0])], [torch.tensor([1.0])]]
    # scale 1: (0.5 + 1) / 2 maps; scale 2: 2; over scales: (0.75 + 2) / 2
    assert feature_matching(fr, ff).item() == pytest.approx(1.375)


def test_balancer_by_hand():
    y = torch.zeros(2, 3, requires_grad=True)
    a = torch.tensor([[3.0, 0.0, 4.0], [0.0, 0.0, 1.0]])  # per-item norms 5 and 1 -> mean 3
    b = torch.tensor([[0.0, 1.0, 0.0], [0.0, 2.0, 0.0]])  # per-item norms 1 and 2 -> mean 1.5
    bal = Balancer({"x": 1.0, "z": 3.0}, total_norm=2.0, ema_decay=0.5)
    grad, norms = bal.gradient({"x": (a * y).sum(), "z": (b * y).sum()}, y)
    assert norms == pytest.approx({"x": 3.0, "z": 1.5})
    expected = 2.0 * (0.25 * a / 3.0 + 0.75 * b / 1.5)
    torch.testing.assert_close(grad, expected)
    # second call with doubled gradients: bias-corrected EMA = (0.5 * 3 + 6) / (0.5 + 1) = 5 for x
    grad, _ = bal.gradient({"x": (2 * a * y).sum(), "z": (2 * b * y).sum()}, y)
    torch.testing.assert_close(grad, 2.0 * (0.25 * 2 * a / 5.0 + 0.75 * 2 * b / 2.5))
    state = bal.state_dict()
    other = Balancer({"x": 1.0, "z": 3.0}, total_norm=2.0, ema_decay=0.5)
    other.load_state_dict(state)
    assert other.state_dict() == state


def _tiny_mimi(seed: int = 0) -> Mimi:
    torch.manual_seed(seed)
    cfg = CodecModelConfig(shapes="tiny", n_q=4, bins=64).mimi_config()
    return Mimi(cfg)


def test_quantization_rate_and_level_dropout_draws(speech_files):
    # Per item: quantized with probability 0.5 (drawn from the item's own generator, any rank or resume)
    clips = AudioClips(speech_files, 3840, 1920, 24_000, seed=0)
    u = torch.stack([clips[ItemRequest(i % 4, i)]["u"][0] for i in range(2000)])
    assert abs(float((u < 0.5).float().mean()) - 0.5) < 0.04
    assert torch.equal(clips[ItemRequest(1, 77)]["u"], clips[ItemRequest(1, 77)]["u"])
    # Per step: the number of acoustic levels is uniform over 1..n_rest, identical for every process
    n_rest = 7
    draws = torch.tensor([int(torch.randint(1, n_rest + 1, (1,), generator=step_generator(0, s)))
                          for s in range(1, 3501)])
    counts = torch.bincount(draws, minlength=n_rest + 1)[1:].float()
    assert counts.min() > 0 and (counts / counts.mean() - 1).abs().max() < 0.15
    # The quantizer obeys both draws: unquantized items get the latent through, others the codewords
    mimi = _tiny_mimi()
    q = mimi.quantizer.train()
    latent = torch.randn(4, q.cfg.input_dimension, 6)
    keep = torch.tensor([True, False, True, False])
    out = q(latent, 12.5, torch.Generator().manual_seed(0), unquantized=keep, n_acoustic=2)
    assert out.codes.shape == (4, 3, 6)
    assert out.bandwidth.item() == pytest.approx(3 * math.log2(64) * 12.5 / 1000)
    q.eval()
    quantized = q.decode(q.encode(latent)[:, :3])
    passthrough = q.rvq_first.output_proj(q.rvq_first.input_proj(latent)) + \
        q.rvq_rest.output_proj(q.rvq_rest.input_proj(latent))
    torch.testing.assert_close(out.x[keep], passthrough[keep], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.x[~keep], quantized[~keep], rtol=1e-4, atol=1e-5)
    assert out.semantic is not None and out.semantic.shape == out.x.shape


def test_teacher_pooling_is_aligned_with_mimi_frames():
    frames = 5
    n50 = 4 * frames - 1  # what a WavLM/HuBERT conv stack gives for frames * 1280 samples at 16 kHz
    for j in range(n50):
        impulse = torch.zeros(1, n50, 1)
        impulse[0, j, 0] = 1.0
        pooled = pool_to_frames(impulse, frames)[0, :, 0]
        assert pooled.shape == (frames,)
        # 50 Hz frame j is averaged into the Mimi frames f whose window 4f-2 .. 4f+5 holds it
        inside = [f for f in range(frames) if 4 * f - 2 <= j <= 4 * f + 5]
        assert set(torch.nonzero(pooled).flatten().tolist()) <= set(inside)
        assert all(pooled[f] > 0 for f in inside if 0 < 4 * f - 2 and 4 * f + 5 < n50)
    ramp = torch.arange(n50, dtype=torch.float)[None, :, None]
    centre = pool_to_frames(ramp, frames)[0, 1:-1, 0]
    torch.testing.assert_close(centre, torch.tensor([4.0 * f + 1.5 for f in range(1, frames - 1)]))


@pytest.mark.parametrize("kind", ["wavlm", "hubert"])
def test_tiny_teacher_gives_one_feature_per_mimi_frame(kind):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 conv_dim=(16,) * 7)
    if kind == "wavlm":
        model = transformers.WavLMModel(transformers.WavLMConfig(**small))
    else:
        model = transformers.HubertModel(transformers.HubertConfig(**small))
    teacher = SemanticTeacher(kind, layer=1, model=model)
    assert teacher.dim == 32
    for frames in (1, 3, 7):
        feats = teacher.features(torch.randn(2, 1, frames * 1920), 1920, 24_000)
        assert feats.shape == (2, frames, 32)
    # a partial frame counts as a frame, as Mimi pads it
    assert teacher.features(torch.randn(1, 1, 3 * 1920 + 5), 1920, 24_000).shape == (1, 4, 32)


def test_weight_norm_training_model_exports_a_plain_mimi(tmp_path, speech_batch):
    mimi = _tiny_mimi(1)
    apply_weight_norm(mimi)
    fill_codebooks(mimi, speech_batch[:, :, :24_000])
    with torch.no_grad():  # move g away from |v| so that folding has something to do
        for name, p in mimi.named_parameters():
            if name.endswith("original0"):
                p.mul_(1.5)
    model = TrainableMimi(mimi).eval()
    wav = speech_batch[:, :, :19_200]
    plain = fold_weight_norm(mimi).eval()
    assert not any("parametrizations" in k for k in plain.state_dict())
    with torch.no_grad():
        codes = plain.encode(wav)
        ref, _, _ = model(wav)
    torch.testing.assert_close(plain.decode(codes)[..., :wav.shape[-1]], ref, rtol=1e-4, atol=1e-5)
    export_mimi(mimi, tmp_path, mimi.cfg)
    loaded = load_mimi(tmp_path, num_codebooks=mimi.total_codebooks)
    assert torch.equal(loaded.encode(wav), codes)
    assert set(loaded.state_dict()) == set(Mimi(loaded.cfg).state_dict())


@pytest.mark.slow  # two official-size Mimis
def test_official_shape_export_loads_in_reference_with_identical_codes(tmp_path, speech_batch):
    loaders = pytest.importorskip("moshi.models.loaders")
    torch.manual_seed(0)
    mimi = Mimi(CodecModelConfig(shapes="mimi", n_q=32, bins=2048).mimi_config())
    apply_weight_norm(mimi)
    wav = speech_batch[:, :, :38_400]
    fill_codebooks(mimi, wav)
    with torch.no_grad():
        for name, p in mimi.named_parameters():
            if name.endswith("original0"):
                p.mul_(1.2)
    path = export_mimi(mimi, tmp_path, mimi.cfg)
    ours = load_mimi(tmp_path, num_codebooks=8)
    ref = loaders.get_mimi(path, num_codebooks=8)
    with torch.no_grad():
        expected = ref.encode(wav)
        got = ours.encode(wav)
    assert torch.equal(got, expected)
    assert len(torch.unique(expected)) > 10


def test_audio_clips_are_the_same_with_loader_workers(speech_files):
    from torch.utils.data import DataLoader

    from openmoshi.data.audio_clips import collate_clips
    from openmoshi.data.order import ShardedBatchSampler
    clips = AudioClips(speech_files, 3840, 1920, 24_000, seed=0)

    def take(workers: int) -> list[dict]:
        loader = DataLoader(clips, batch_sampler=ShardedBatchSampler(len(clips), 4, 0, 1, seed=0),
                            num_workers=workers, collate_fn=collate_clips)
        it = iter(loader)
        return [next(it) for _ in range(3)]

    for x, y in zip(take(0), take(2)):
        assert torch.equal(x["wav"], y["wav"]) and torch.equal(x["u"], y["u"])
        assert x["wav"].shape == (4, 1, 3840) and x["wav"].abs().sum() > 0


def test_variance_preserving_init_makes_the_latent_follow_the_audio(speech_files):
    """torch's default init leaves the tiny encoder's latent nearly constant (biases dominate), which made the
    codebooks of CPU-sized runs collapse onto one code per level; the training init keeps the audio in it."""
    from conftest import read_speech
    from openmoshi.codec import mimi_tiny
    from openmoshi.train.codec.model import variance_preserving_init_
    wav = read_speech(speech_files[0], 2.0)[0].reshape(1, 1, -1)

    def time_variation(mimi: Mimi) -> float:  # std over time of the latent, relative to its magnitude
        with torch.no_grad():
            latent = mimi.encode_to_latent(wav)
        return float(latent.std(-1).mean() / latent.abs().mean())

    torch.manual_seed(0)
    default = Mimi(mimi_tiny())
    torch.manual_seed(0)
    fresh = variance_preserving_init_(Mimi(mimi_tiny()))
    assert time_variation(default) < 0.3 < 1.0 < time_variation(fresh)
    convs = [m for m in fresh.encoder.modules() if isinstance(m, torch.nn.Conv1d)]
    assert convs and all(c.bias is None or not c.bias.any() for c in convs)
    first = convs[0].weight
    assert abs(first.std().item() - (first.shape[1] * first.shape[2]) ** -0.5) < 0.5 * (first.shape[1] * first.shape[2]) ** -0.5


def test_codec_init_scheme_is_checked(tmp_path, speech_files):
    from openmoshi.errors import ConfigError
    from openmoshi.train.codec.config import tiny
    from openmoshi.train.codec.task import CodecTask
    cfg = tiny()
    cfg.data.paths = [str(speech_files[0])]
    cfg.model.init_scheme = "xavier"
    with pytest.raises(ConfigError, match="init_scheme"):
        CodecTask(cfg, tmp_path)._build_mimi()
