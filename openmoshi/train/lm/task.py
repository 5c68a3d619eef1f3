"""The LM stage on the training core: model set-up (scratch, --init, LoRA), data, optimizers, step, export."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...bundle import ASSETS, _fill_codebooks_randomly, load_codec, load_tokenizer
from ...checkpoint import ModelSource, save_safetensors
from ...codec import Mimi, load_mimi, mimi_official, mimi_tiny, save_mimi
from ...data.codes import CodeShards, codec_key
from ...data.interleave import NO_TOKEN, InterleaveConfig
from ...data.lm_dataset import AudioLMDataset, TextLMDataset, UserAugment
from ...data.order import ItemRequest, item_generator
from ...data.sources import DataError, read_manifest
from ...errors import ConfigError
from ...lm.config import PRESETS, LMConfig
from ...lm.loading import CONFIG_NAME, LORA_NAME, load_lm, read_config, stored_dtype
from ...lm.model import LMModel
from ..task import TrainEnv
from .config import LMTrainConfig
from .lora import (
    BASE_DTYPES,
    add_lora,
    base_state_dict,
    has_lora,
    hold_frozen_base,
    lora_state_dict,
    merged_state_dict,
)
from .loss import lm_loss, user_text_loss

logger = logging.getLogger(__name__)

_DEPTH = ("depformer", "linears.")  # parameters of the depth transformer (its own learning rate)


def with_acoustic_delay(cfg: LMConfig, delay: int) -> LMConfig:
    """Delays with the acoustic codebooks (all but the first of each audio stream) at `delay`."""
    delays = [0] * cfg.num_codebooks
    for k in range(cfg.n_q):
        first_of_stream = k == 0 or k == cfg.dep_q
        delays[1 + k] = 0 if first_of_stream else delay
    return cfg.replace(delays=delays)


def copy_moshi_embeddings_to_user(lm: LMModel) -> None:
    """User codebook k's input table := Moshi's codebook k's (same codec, same codes)."""
    cfg = lm.cfg
    if not cfg.n_user:
        raise ConfigError("model.user_emb_from_moshi: this model has no user audio stream")
    with torch.no_grad():
        for k in range(min(cfg.n_user, cfg.dep_q)):
            lm.emb[cfg.dep_q + k].weight.copy_(lm.emb[k].weight)


def is_audio_manifest(path: str) -> bool:
    p = Path(path)
    if p.is_dir():
        return any(p.rglob("*.jsonl")) and not any(p.rglob("*.txt"))
    if p.suffix != ".jsonl":
        return False
    with p.open() as f:
        first = f.readline()
    try:
        return "path" in json.loads(first)
    except ValueError:
        return False


def frozen_base_dtype(cfg: LMTrainConfig, fsdp: bool) -> torch.dtype | None:
    """The dtype LoRA's frozen base is held in (None: no LoRA, the model is trained in fp32 as a whole).
    auto = bf16 when the --init checkpoint stores bf16: the widened weights are exactly the file's values, so
    the compute is unchanged and only the memory halves; an fp32 checkpoint would be rounded, so it stays fp32."""
    choice = cfg.lora.base_dtype
    if not cfg.lora.rank:
        if choice == "bf16":
            raise ConfigError("lora.base_dtype=bf16 holds LoRA's frozen base: it needs --lora-rank > 0")
        return None
    if choice == "auto":
        stored = stored_dtype(cfg.model.init) if cfg.model.init else torch.float32
        choice = "bf16" if stored == torch.bfloat16 and not fsdp else "fp32"
    if choice == "bf16" and fsdp:
        raise ConfigError("lora.base_dtype=bf16 does not work with --parallel fsdp (FSDP2 shards one dtype per "
                          "layer): use --parallel ddp, or lora.base_dtype=fp32")
    return BASE_DTYPES[choice]


class WarmupCosine:
    """Linear warmup then cosine decay to min_ratio, applied to every optimizer it holds (per-group base lr)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer], warmup: int, total: int, min_ratio: float) -> None:
        self.optimizers, self.warmup, self.total, self.min_ratio = optimizers, warmup, total, min_ratio
        self.base = [[g["lr"] for g in opt.param_groups] for opt in optimizers]
        self.count = 0
        self._apply()

    def factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def _apply(self) -> None:
        f = self.factor(self.count)
        for opt, bases in zip(self.optimizers, self.base):
            for group, base in zip(opt.param_groups, bases):
                group["lr"] = base * f

    def step(self) -> None:
        self.count += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizers[0].param_groups]

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]
        self._apply()


class StageOptimizer:
    """AdamW for audio batches, and a second one with its own state for text-only batches (the paper's
    pretraining): the loop clips and steps whichever the current batch trained."""

    def __init__(self, main: torch.optim.Optimizer, text: torch.optim.Optimizer | None) -> None:
        self.main, self.text = main, text
        self.active = main

    def use_text(self, text_batch: bool) -> None:
        self.active = self.text if (text_batch and self.text is not None) else self.main

    @property
    def param_groups(self) -> list[dict]:
        return self.active.param_groups

    def step(self) -> None:
        self.active.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.main.zero_grad(set_to_none=set_to_none)
        if self.text is not None:
            self.text.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"main": self.main.state_dict(), "text": self.text.state_dict() if self.text else None}

    def load_state_dict(self, state: dict) -> None:
        self.main.load_state_dict(state["main"])
        if self.text is not None and state.get("text") is not None:
            self.text.load_state_dict(state["text"])


class LMItems(torch.utils.data.Dataset):
    """Training items by request: audio crops (with per-item delay jitter and text masking) and, on text
    steps, text windows. Returns (grid [K, T], is_text)."""

    def __init__(self, audio: AudioLMDataset | None, text: TextLMDataset | None, cfg: LMTrainConfig) -> None:
        self.audio, self.text, self.cfg = audio, text, cfg

    def __len__(self) -> int:
        return len(self.audio) if self.audio is not None else len(self.text)  # type: ignore[arg-type]

    def is_text_step(self, serial: int) -> bool:
        every = self.cfg.data.text_batch_every
        if self.audio is None:
            return True
        if self.text is None or every <= 0:
            return False
        return (serial // self.cfg.train.batch_size) % every == every - 1

    def __getitem__(self, req: ItemRequest) -> tuple[torch.Tensor, bool]:
        gen = item_generator(self.cfg.train.seed, req.serial)
        if self.is_text_step(req.serial):
            assert self.text is not None
            index = req.index if self.audio is None else int(torch.randint(len(self.text), (1,), generator=gen))
            return self._with_user_text(self.text[index], None), True
        assert self.audio is not None
        data = self.cfg.data
        interleave = self.audio.interleave
        if data.delay_jitter:
            delay = (torch.rand((), generator=gen).item() * 2 - 1) * data.delay_jitter
            interleave = replace(interleave, delay=interleave.delay + delay)
        grid = self.audio.item(req.index, interleave, gen)
        if data.text_mask_prob and torch.rand((), generator=gen).item() < data.text_mask_prob:
            grid[0] = NO_TOKEN
        return self._with_user_text(grid, req.index), False

    def _with_user_text(self, grid: torch.Tensor, index: int | None) -> torch.Tensor:
        """With the auxiliary loss on, one more row: the user's words `user_text_delay` late (-1 on text
        items and mono speech, which have no user)."""
        if not self.cfg.loss.user_text_weight:
            return grid
        row = torch.full(grid.shape[1:], NO_TOKEN, dtype=torch.long)
        n_user = self.audio.cfg.n_user if self.audio is not None else 0
        if index is not None and n_user and bool((grid[-n_user:] != NO_TOKEN).any()):
            assert self.audio is not None
            delayed = replace(self.audio.interleave, delay=-self.cfg.data.user_text_delay)
            row = self.audio.other_text(index, delayed)
        return torch.cat([grid, row[None]])


class WithUserText(nn.Module):
    """The LM and the auxiliary head that transcribes the user, as one module (one DDP wrapper):
    codes [B, K, T] -> (LMOutput, user text logits [B, T, V])."""

    def __init__(self, lm: LMModel, head: nn.Linear) -> None:
        super().__init__()
        self.lm, self.head = lm, head

    def forward(self, codes: torch.Tensor) -> tuple[Any, torch.Tensor]:
        out = self.lm(codes)
        return out, self.head(out.hidden)


def collate(items: list[tuple[torch.Tensor, bool]]) -> tuple[torch.Tensor, bool]:
    kinds = {is_text for _, is_text in items}
    if len(kinds) != 1:
        raise RuntimeError("a batch mixes text-only and audio items")
    return torch.stack([grid for grid, _ in items]), kinds.pop()


def default_user_augment(seed: int) -> UserAugment:
    """openmoshi.data.augment's user-channel augmentation (gain -24..+15 dB, noise, reverb, echo of Moshi's
    channel) as a dataset hook."""
    try:
        from ...data.augment import UserAugmenter  # type: ignore[import-not-found]
    except ImportError as exc:
        raise ConfigError("data.augment_user needs openmoshi.data.augment, which this build lacks") from exc
    augmenter = UserAugmenter(seed=seed)

    def augment(user: torch.Tensor, moshi: torch.Tensor, sample_rate: int, gen: torch.Generator) -> torch.Tensor:
        index = int(torch.randint(2**31 - 1, (1,), generator=gen))
        out, _ = augmenter(torch.cat([moshi, user]), index=index)
        return out[1:2]

    return augment


class LMTask:
    """`openmoshi train lm`: see openmoshi/train/__init__.py for the contract."""

    def __init__(self, cfg: LMTrainConfig, user_augment: UserAugment | None = None) -> None:
        self.cfg = cfg
        if user_augment is None and cfg.data.augment_user and not cfg.data.codes:
            user_augment = default_user_augment(cfg.train.seed)
        self.user_augment = user_augment
        frames = math.ceil(cfg.data.duration * 12.5 - 1e-6)
        self.throughput_unit = ("frames", float(frames))
        self._items: LMItems | None = None

    # ---- models
    def _build(self, device: torch.device, lm_device: torch.device | None = None, as_stored: bool = False) -> None:
        """Builds the LM on lm_device (default device; in fp32, or with as_stored in the dtype of the --init
        file), Mimi on device."""
        m = self.cfg.model
        lm_device = lm_device or device
        if m.init:
            lm_cfg, _ = read_config(m.init)
            lm = load_lm(m.init, device=lm_device, dtype=stored_dtype(m.init) if as_stored else torch.float32)
            source = ModelSource(m.init)
            tokenizer_path = m.tokenizer or source.require(lm_cfg.tokenizer_name, "text tokenizer")
            mimi = load_codec(m.codec or m.init, device)
        else:
            if m.preset not in PRESETS:
                raise ConfigError(f"unknown model preset {m.preset!r}; choose one of {sorted(PRESETS)}")
            lm_cfg = PRESETS[m.preset]()
            if m.preset == "moshi_7b" and not m.tokenizer:
                raise ConfigError("training the 7B from scratch needs --tokenizer (Kyutai's tokenizer_spm_32k_3.model)")
            tokenizer_path = m.tokenizer or str(ASSETS / lm_cfg.tokenizer_name)
            lm = LMModel(lm_cfg).to(lm_device)
            if m.codec:
                mimi = load_codec(m.codec, device, num_codebooks=max(lm_cfg.dep_q, lm_cfg.n_user)) \
                    if Path(m.codec).is_dir() or m.codec.startswith("hf://") \
                    else load_mimi(m.codec, num_codebooks=max(lm_cfg.dep_q, lm_cfg.n_user), device=device)
            else:
                mimi = Mimi(mimi_tiny() if m.preset == "tiny" else mimi_official())
                _fill_codebooks_randomly(mimi, self.cfg.train.seed)
                mimi.set_num_codebooks(max(lm_cfg.dep_q, lm_cfg.n_user))
                mimi = mimi.to(device).eval()
        self.tokenizer_path = str(tokenizer_path)
        self.tokenizer = load_tokenizer(tokenizer_path)
        if m.acoustic_delay:
            lm.cfg = with_acoustic_delay(lm.cfg, m.acoustic_delay)
        if m.user_emb_from_moshi:
            copy_moshi_embeddings_to_user(lm)
        if self.cfg.train.activation_checkpointing:
            for t in (lm.transformer, lm.depformer):
                if t is not None:
                    t.cfg.checkpointing = True
        self.mimi: Mimi | None = mimi
        self.lm = lm.train()
        if mimi is not None:
            mimi.requires_grad_(False)

    def setup(self, env: TrainEnv) -> None:
        cfg = self.cfg
        # Under FSDP the LM is loaded on the CPU as stored (a bf16 file stays mapped, its pages shared by every
        # process); wrap() casts each layer to fp32 just before fully_shard moves its shard to the device.
        # A bf16 frozen base is loaded as stored too, then only the parts trained or computed in fp32 are widened.
        base = frozen_base_dtype(cfg, env.fsdp)
        self._build(env.device, torch.device("cpu") if env.fsdp else env.device,
                    as_stored=env.fsdp or base == torch.bfloat16)
        if cfg.lora.rank:
            add_lora(self.lm, cfg.lora)  # freezes all but the adapters (and embeddings if asked)
        if base is not None and not env.fsdp:
            hold_frozen_base(self.lm, base)  # adapters, norms and the rest in fp32
        cast = None if base is not None and not env.fsdp else torch.float32
        self.user_text_head: nn.Linear | None = None
        if cfg.loss.user_text_weight:
            # starts as a copy of the text head: same vocabulary, and a useful reading of the hidden state
            self.user_text_head = nn.Linear(self.lm.cfg.dim, self.lm.text_linear.out_features, bias=False)
            with torch.no_grad():
                self.user_text_head.weight.copy_(self.lm.text_linear.weight)
            self.user_text_head.to(env.device)
            self.fwd = env.wrap(WithUserText(self.lm, self.user_text_head), dtype=cast)
        else:
            self.fwd = env.wrap(self.lm, dtype=cast)
        # under FSDP the parameters are replaced by shards: list them after wrapping
        named = [(n, p) for n, p in self.lm.named_parameters() if p.requires_grad]
        if self.user_text_head is not None:
            named += [("user_text_head.weight", self.user_text_head.weight)]
        o = cfg.optim

        def groups(params: list[tuple[str, nn.Parameter]]) -> list[dict]:
            out = []
            for depth in (False, True):
                for decay in (True, False):
                    ps = [p for n, p in params if n.startswith(_DEPTH) == depth and (p.dim() >= 2 and "alpha" not in n
                                                                                   and "norm" not in n) == decay]
                    if ps:
                        out.append({"params": ps, "lr": o.lr * (o.depth_lr_scale if depth else 1.0),
                                    "weight_decay": o.weight_decay if decay else 0.0})
            return out

        main = torch.optim.AdamW(groups(named), lr=o.lr, betas=(o.beta1, o.beta2), eps=1e-8)
        text_opt = None
        self._build_data()
        items = self._items
        assert items is not None
        if items.audio is not None and items.text is not None and cfg.data.text_batch_every > 0:
            temporal = [(n, p) for n, p in named if not n.startswith(_DEPTH)]
            text_opt = torch.optim.AdamW(groups(temporal), lr=o.lr, betas=(o.beta1, o.beta2), eps=1e-8)
        self.opt = StageOptimizer(main, text_opt)
        self.sched = WarmupCosine([main] + ([text_opt] if text_opt else []), o.warmup_steps, cfg.train.max_steps,
                                  o.min_lr_ratio)

    # ---- data
    def _audio_dataset(self, sources: list[str]) -> AudioLMDataset:
        items = [it for s in sources for it in read_manifest(s)]
        shards = None
        if self.cfg.data.codes:
            if self.user_augment is not None:
                raise ConfigError("a user augmentation function runs before encoding: drop --codes to use it (or "
                                  "precompute augmented user channels: `openmoshi data encode --user-variants N`)")
            assert self.mimi is not None
            shards = CodeShards(self.cfg.data.codes, codec_key(self.mimi))
        if self.mimi is None:
            raise DataError("audio data needs the model's codec")
        interleave = InterleaveConfig(pad_id=self.lm.cfg.existing_text_padding_id,
                                      epad_id=self.lm.cfg.existing_text_end_padding_id,
                                      keep_and_shift=self.cfg.data.keep_and_shift, delay=self.cfg.data.text_delay)
        return AudioLMDataset(items, self.lm.cfg, self.tokenizer, self.cfg.data.duration, interleave,
                              mimi=None if shards else self.mimi, shards=shards, user_augment=self.user_augment,
                              user_variants=bool(shards) and self.cfg.data.augment_user,
                              seed=self.cfg.train.seed, user_shift=self.cfg.data.user_shift)

    def _text_dataset(self, sources: list[str]) -> TextLMDataset:
        from ...data.sources import read_text_documents
        docs = [d for s in sources for d in read_text_documents(s)]
        return TextLMDataset(docs, self.lm.cfg, self.tokenizer, int(self.throughput_unit[1]))

    def _split(self, sources: list[str]) -> tuple[list[str], list[str]]:
        audio = [s for s in sources if is_audio_manifest(s)]
        return audio, [s for s in sources if s not in audio]

    def _build_data(self) -> None:
        d = self.cfg.data
        if not d.data:
            raise ConfigError("no training data: pass --data (audio manifests, or text corpora for --stage text)")
        audio_src, text_src = self._split(d.data)
        text_src += d.text_data
        if self.cfg.stage == "text":
            audio_src = []
        elif not audio_src:
            raise ConfigError(f"--stage {self.cfg.stage} needs audio data: JSONL manifests of {{path, duration}}")
        audio = self._audio_dataset(audio_src) if audio_src else None
        text = self._text_dataset(text_src) if text_src else None
        if audio is None and text is None:
            raise ConfigError("no usable training data")
        self._items = LMItems(audio, text, self.cfg)
        self._eval_items: Any = None

    # ---- the Task protocol
    def models(self) -> dict[str, nn.Module]:
        if self.user_text_head is not None:
            return {"lm": self.lm, "user_text_head": self.user_text_head}
        return {"lm": self.lm}

    def ema_models(self) -> list[str]:
        return ["lm"]

    def optimizers(self) -> dict[str, Any]:
        return {"lm": self.opt}

    def schedulers(self) -> dict[str, Any]:
        return {"lm": self.sched}

    def grad_clip(self) -> dict[str, float]:
        return {"lm": self.cfg.optim.clip}

    def dataset(self) -> torch.utils.data.Dataset:
        assert self._items is not None
        return self._items

    def collate(self) -> Callable:
        return collate

    def train_step(self, batch: tuple[torch.Tensor, bool], env: TrainEnv) -> dict[str, torch.Tensor | float]:
        codes, is_text = batch
        codes = codes.to(env.device)
        self.opt.use_text(is_text)
        cfg = self.lm.cfg
        pad_ids = (cfg.existing_text_padding_id, cfg.existing_text_end_padding_id)
        if self.user_text_head is not None:
            codes, user_text = codes[:, :-1], codes[:, -1]
            out, user_logits = self.fwd(codes)
            loss, metrics = lm_loss(out, codes, self.cfg.loss, pad_ids)
            aux, aux_metrics = user_text_loss(user_logits, user_text, self.cfg.loss, pad_ids)
            loss = loss + aux
            metrics.update(aux_metrics)
            metrics["loss"] = loss.detach()
        else:
            out = self.fwd(codes)
            loss, metrics = lm_loss(out, codes, self.cfg.loss, pad_ids)
        env.backward(loss)
        mixing = self._items is not None and self._items.audio is not None and self._items.text is not None \
            and self.cfg.data.text_batch_every > 0
        if mixing:  # audio and text-only steps alternate: keep their curves apart, same keys on every step
            prefix = "textonly_" if is_text else ""
            keep = ("loss", "text_ce", "text_acc") if is_text else tuple(metrics)
            metrics = {f"{prefix}{k}": v for k, v in metrics.items() if k in keep}
        return metrics

    def evaluation_data(self) -> list[torch.Tensor]:
        """Held-out grids (eval_data, else the first crops of the training data), fixed for the run."""
        if self._eval_items is None:
            d = self.cfg.data
            if d.eval_data:
                audio_src, text_src = self._split(d.eval_data)
                source: Any = self._audio_dataset(audio_src) if audio_src else self._text_dataset(text_src)
            else:
                assert self._items is not None
                source = self._items.audio if self._items.audio is not None else self._items.text
            self._eval_items = [source[i] for i in range(min(d.eval_items, len(source)))]
        return self._eval_items

    def evaluate(self, models: dict[str, nn.Module], env: TrainEnv) -> dict[str, float]:
        from ...eval.lm import evaluate_grids
        lm = models["lm"]
        was_training = lm.training
        lm.eval()
        try:
            return evaluate_grids(lm, self.evaluation_data(), self.tokenizer, env.device)
        finally:
            lm.train(was_training)

    def export(self, models: dict[str, nn.Module], out_dir: Path) -> None:
        export_model(models["lm"], out_dir, self.mimi, self.tokenizer, self.cfg)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def export_model(lm: LMModel, folder: Path, mimi: Mimi | None, tokenizer, cfg: LMTrainConfig) -> Path:
    """Write a model folder in Kyutai's layout (`openmoshi infer`/`serve` and Kyutai's loaders take it):
    config.json, model.safetensors (base weights), lora.safetensors with LoRA unless merged, Mimi, tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    lm_cfg = lm.cfg.replace(moshi_name="model.safetensors", lora=False, lora_name=None)
    if has_lora(lm) and not cfg.lora.merged:
        save_safetensors(base_state_dict(lm), folder / "model.safetensors")
        save_safetensors(lora_state_dict(lm, cfg.lora.rank), folder / LORA_NAME)
        lm_cfg = lm_cfg.replace(lora=True, lora_name=LORA_NAME, lora_rank=cfg.lora.rank,
                                lora_scaling=cfg.lora.scaling)
    else:
        state = merged_state_dict(lm) if has_lora(lm) else lm.state_dict()
        save_safetensors({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    if mimi is not None:
        if mimi.cfg != mimi_official():
            lm_cfg = lm_cfg.replace(mimi_config_name="mimi_config.json")
            (folder / "mimi_config.json").write_text(json.dumps(mimi.cfg.to_kyutai(), indent=2) + "\n")
        save_mimi(mimi, folder / lm_cfg.mimi_name)
    (folder / lm_cfg.tokenizer_name).write_bytes(tokenizer.serialized_model_proto())
    (folder / CONFIG_NAME).write_text(json.dumps(lm_cfg.to_kyutai(), indent=2) + "\n")
    return folder
