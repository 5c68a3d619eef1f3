"""Codec training configuration: presets `tiny` (a few M parameters, CPU) and `mimi` (the official shapes).

Loss presets (`losses.preset`, or `--losses`):
    adversarial  the paper's final Mimi: hinge adversarial 4 + L1 feature matching 4, through the balancer
    encodec      EnCodec's mix: adversarial 4, feature matching 4, waveform L1 0.1, multi-scale mel 2, balancer
Commitment and distillation are added beside the balanced terms with their own weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...codec.config import MimiConfig, mimi_official
from ...codec.quantizer import QuantizerConfig
from ...codec.seanet import SeanetConfig
from ...errors import ConfigError
from ...nn.transformer import TransformerConfig
from ..config import TrainConfig
from .discriminator import DiscriminatorConfig

LOSS_PRESETS = {
    "adversarial": {"adv": 4.0, "feat": 4.0, "l1": 0.0, "msspec": 0.0},
    "encodec": {"adv": 4.0, "feat": 4.0, "l1": 0.1, "msspec": 2.0},
}


@dataclass
class CodecModelConfig:
    shapes: str = "tiny"  # tiny | mimi (official Mimi shapes)
    n_q: int = 8  # quantizer levels, semantic included
    bins: int = 2048  # codewords per level
    init: str = ""  # start from this codec (folder, .safetensors or hf://...) instead of random weights
    # from scratch: variance_preserving (SEANet convs ~N(0, 1/fan_in), zero bias; the latent follows the audio
    # from step 0) or torch (PyTorch's default init, as audiocraft: fine at scale, collapses at CPU scale)
    init_scheme: str = "variance_preserving"
    weight_norm: bool = True  # weight norm on the SEANet convs while training (folded away on export)
    quantization_rate: float = 0.5  # probability that an item goes through the quantizer
    q_dropout: bool = True  # draw the number of acoustic levels uniformly in 1..n_q - 1 each step
    codebook_decay: float = 0.99

    def mimi_config(self) -> MimiConfig:
        if self.shapes == "mimi":
            cfg = mimi_official()
        elif self.shapes == "tiny":
            cfg = MimiConfig(
                seanet=SeanetConfig(dimension=128, n_filters=16),
                quantizer=QuantizerConfig(dimension=64, input_dimension=128, output_dimension=128),
                transformer=TransformerConfig(d_model=128, num_heads=4, num_layers=2, dim_feedforward=512,
                                              causal=True, context=250, norm="layer_norm", layer_scale=0.01,
                                              gating="none", positional_embedding="rope"))
        else:
            raise ConfigError(f"model.shapes must be tiny or mimi, got {self.shapes!r}")
        cfg.quantizer.n_q, cfg.quantizer.bins, cfg.quantizer.decay = self.n_q, self.bins, self.codebook_decay
        cfg.quantizer.__post_init__()
        return cfg


@dataclass
class LossConfig:
    preset: str = "adversarial"  # adversarial | encodec: sets the four weights below unless given
    adv: float | None = None  # hinge adversarial (generator side)
    feat: float | None = None  # L1 feature matching
    l1: float | None = None  # waveform L1
    msspec: float | None = None  # multi-scale mel
    balancer: bool = True  # EnCodec's gradient balancer over the four terms above
    balancer_total_norm: float = 1.0
    balancer_ema: float = 0.999
    commitment: float = 1.0  # quantizer commitment loss weight (outside the balancer)
    distill: float = 1.0  # semantic distillation (cosine distance) weight (outside the balancer)
    disc_every: int = 1  # discriminator step every N steps
    adv_start: int = 0  # steps of reconstruction-only warm-up before adversarial terms (encodec preset)

    def __post_init__(self) -> None:
        if self.preset not in LOSS_PRESETS:
            raise ConfigError(f"losses.preset must be one of {sorted(LOSS_PRESETS)}, got {self.preset!r}")

    def weights(self) -> dict[str, float]:
        base = LOSS_PRESETS[self.preset]
        return {k: (getattr(self, k) if getattr(self, k) is not None else v) for k, v in base.items()}


@dataclass
class OptimConfig:
    lr: float = 8e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    weight_decay: float = 5e-2  # on transformer parameters only
    disc_lr: float = 8e-4
    disc_betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    warmup_steps: int = 0  # linear warm-up of both learning rates
    grad_clip: float = 0.0  # max gradient norm of the codec (0 = none)
    disc_grad_clip: float = 0.0


@dataclass
class DistillConfig:
    # WavLM/HuBERT folder or Hugging Face id; `phonemes` / `letters`: targets from the data's word alignments
    # (NAME.json beside each file; for codecs trained without a speech model); empty = no distillation
    teacher: str = ""
    layer: int = -1  # hidden-state index of the teacher (-1 = last layer)
    cache_dir: str = ""  # where teacher features are cached (default RUN/teacher_cache)
    teacher_dim: int = 0  # filled from the teacher at setup (kept so the projection can be rebuilt)
    alignment_dim: int = 256  # width of the alignment teacher's unit embeddings


@dataclass
class CodecDataConfig:
    paths: list[str] = field(default_factory=list)  # training folders / files / .jsonl manifests
    eval_paths: list[str] = field(default_factory=list)  # held-out data for evaluation (default: training data)
    segment_seconds: float = 1.0  # training crop length (rounded to whole 80 ms frames)
    eval_seconds: float = 4.0  # evaluation crop length
    eval_items: int = 4  # evaluation items (and audio samples written)


@dataclass
class CodecTrainConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    model: CodecModelConfig = field(default_factory=CodecModelConfig)
    losses: LossConfig = field(default_factory=LossConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    data: CodecDataConfig = field(default_factory=CodecDataConfig)


def tiny() -> CodecTrainConfig:
    """A few M parameters: trains on a laptop CPU (1 s crops, batch 8, discriminator with 16 filters)."""
    return CodecTrainConfig(
        train=TrainConfig(max_steps=2000, batch_size=8, checkpoint_every=200, eval_every=200, log_every=10),
        model=CodecModelConfig(shapes="tiny", n_q=8, bins=1024),
        discriminator=DiscriminatorConfig(filters=16),
        optim=OptimConfig(lr=8e-4, disc_lr=8e-4),
        data=CodecDataConfig(segment_seconds=1.0))


def mimi() -> CodecTrainConfig:
    """The official Mimi shapes and the paper's recipe (batch 128 x 12 s on GPUs; lower it to fit)."""
    return CodecTrainConfig(
        train=TrainConfig(max_steps=200_000, batch_size=128, checkpoint_every=2000, eval_every=2000,
                          log_every=50),
        model=CodecModelConfig(shapes="mimi", n_q=32, bins=2048),
        data=CodecDataConfig(segment_seconds=12.0, eval_seconds=10.0))


PRESETS = {"tiny": tiny, "mimi": mimi}
