"""Config tree of `openmoshi train lm`, with the paper's stage presets (Moshi §4; spec/moshi.md §5).

    stage        data                                   lr temporal / depth   acoustic delay   extras
    text         text corpora                           3e-4 / 3e-4           (kept)           text only
    audio        mono speech + alignments (+ text)      3e-5 / 2e-4           2                half the batches text-only
                                                                                                (own optimizer state),
                                                                                                text-audio delay +-0.6 s,
                                                                                                text masked 30%
    multistream  stereo (main speaker vs the rest)      3e-6 / 5e-5           1
    finetune     stereo dialogues (moshi-finetune's)    2e-6 / 4e-6           (kept)           user augmentation hook

All: AdamW (0.9, 0.95), weight decay 0.1, linear warmup then cosine decay, gradient clipping 1.0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import TrainConfig
from .lora import LoRAConfig
from .loss import LMLossConfig

STAGES = ("text", "audio", "multistream", "finetune")


@dataclass
class LMModelSection:
    preset: str = "tiny"  # architecture when training from scratch (openmoshi/lm/config.py PRESETS)
    init: str = ""  # model folder or hf://owner/repo to start from (Kyutai's layout); "" = from scratch
    codec: str = ""  # model folder or Mimi file whose codec encodes the audio ("" = the init model's)
    tokenizer: str = ""  # SentencePiece model ("" = the init model's, or the preset's bundled one)
    acoustic_delay: int = 0  # delay of the acoustic codebooks (0 = keep the model's)
    user_emb_from_moshi: bool = False  # start the user's audio embeddings as copies of Moshi's (after audio
    #                                    pretraining on mono speech only Moshi's tables have learned anything)


@dataclass
class LMDataSection:
    data: list[str] = field(default_factory=list)  # audio manifests (stereo dialogues / mono speech) or text
    text_data: list[str] = field(default_factory=list)  # text corpora mixed in as text-only batches
    eval_data: list[str] = field(default_factory=list)  # held-out data ("" = the first crops of data)
    codes: str = ""  # folder of precomputed codes (`openmoshi data encode`); "" = encode on the fly
    duration: float = 10.0  # seconds (frames for text: duration * 12.5 tokens) per item
    text_batch_every: int = 0  # every n-th step is a text-only batch (2 = half of them); 0 = none
    text_delay: float = 0.0  # seconds Moshi's text runs ahead of its audio (> 0) or behind it (< 0)
    delay_jitter: float = 0.0  # text-audio delay drawn uniformly in text_delay + [-x, x] seconds per item
    text_mask_prob: float = 0.0  # probability that an item's text stream is hidden (no input, no target)
    keep_and_shift: bool = False  # stream builder: queue overlapping words instead of cutting the previous one
    augment_user: bool = False  # augment the user channel before encoding (openmoshi.data.augment: gain, noise,
    #                             reverb, echo of Moshi); with --codes, each item draws one of the augmented user
    #                             channels `data encode --user-variants N` precomputed (or the recorded one)
    user_shift: int = 1  # the user's codes one frame ahead, as generation feeds them (0 = moshi-finetune's)
    user_text_delay: float = 0.24  # seconds the user's words come late on the auxiliary transcription target
    #                                (loss.user_text_weight > 0): the model has heard that much of a word
    eval_items: int = 8  # items evaluated at each evaluation

    def __post_init__(self) -> None:
        if self.duration <= 0 or self.text_batch_every < 0 or not 0 <= self.text_mask_prob <= 1 \
                or self.user_text_delay < 0:
            raise ValueError("duration must be > 0, text_batch_every >= 0, text_mask_prob in [0, 1], "
                             "user_text_delay >= 0")


@dataclass
class LMOptimSection:
    lr: float = 3e-4  # temporal transformer (and embeddings, text head)
    depth_lr_scale: float = 1.0  # depth transformer lr = lr * depth_lr_scale
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio
    clip: float = 1.0

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.depth_lr_scale <= 0 or self.warmup_steps < 0:
            raise ValueError("lr and depth_lr_scale must be > 0, warmup_steps >= 0")


@dataclass
class LMTrainConfig:
    stage: str = "finetune"
    train: TrainConfig = field(default_factory=lambda: TrainConfig(ema_decay=0.0, log_every=10))
    model: LMModelSection = field(default_factory=LMModelSection)
    data: LMDataSection = field(default_factory=LMDataSection)
    optim: LMOptimSection = field(default_factory=LMOptimSection)
    loss: LMLossConfig = field(default_factory=LMLossConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")


def stage_config(stage: str, preset: str = "tiny") -> LMTrainConfig:
    """The paper's settings for a stage, on a model preset."""
    cfg = LMTrainConfig(stage=stage)
    cfg.model.preset = preset
    if stage == "text":
        cfg.optim.lr, cfg.optim.depth_lr_scale = 3e-4, 1.0
        cfg.loss.audio_weight = 0.0
    elif stage == "audio":
        cfg.optim.lr, cfg.optim.depth_lr_scale = 3e-5, 2e-4 / 3e-5
        cfg.model.acoustic_delay = 2
        cfg.data.text_batch_every = 2
        cfg.data.delay_jitter = 0.6
        cfg.data.text_mask_prob = 0.3
    elif stage == "multistream":
        cfg.optim.lr, cfg.optim.depth_lr_scale = 3e-6, 5e-5 / 3e-6
        cfg.model.acoustic_delay = 1
    elif stage == "finetune":
        cfg.optim.lr, cfg.optim.depth_lr_scale = 2e-6, 2.0
    else:
        raise ValueError(f"unknown stage {stage!r}; choose one of {STAGES}")
    return cfg
