"""The codec training task (openmoshi.train.task.Task): Mimi + MS-STFT discriminator, one step per micro-batch.

Each step:
    wav [B, 1, S] -> codec (quantized for a `quantization_rate` share of the items, a random number of
    acoustic levels for the whole step) -> wav_hat
    discriminator: hinge loss on [wav, wav_hat.detach()] (one forward), its own optimizer
    codec: adversarial + feature matching (+ L1, multi-scale mel for `encodec`) through the balancer on
    dL/dwav_hat, plus commitment and distillation beside it, in one backward
All random draws come from the item (quantization) or from (seed, step) (level dropout, k-means, dead codes),
so every process and every resume draws the same numbers.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ...audio.io import load_audio, save_wav
from ...codec.loading import load_mimi
from ...codec.mimi import Mimi
from ...data.audio_clips import AudioClips, collate_clips, list_audio
from ...errors import ConfigError
from .. import distributed
from ..task import TrainEnv
from .config import CodecTrainConfig
from .discriminator import MultiScaleSTFTDiscriminator
from .losses import Balancer, MultiScaleMelLoss, feature_matching, hinge_discriminator, hinge_generator
from .model import (TrainableMimi, apply_weight_norm, export_mimi, fold_weight_norm,
                    variance_preserving_init_)
from .teacher import FeatureCache, make_teacher

logger = logging.getLogger(__name__)

FEATURES_IN_MEMORY = 256  # files whose teacher features a data loader keeps


class _ClipsWithTeacher(AudioClips):
    """AudioClips whose items also carry the teacher features of their frames ("teacher" [F, D], "tmask" [F])."""

    def __init__(self, *args, cache: FeatureCache | None = None, teacher_dim: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.cache, self.teacher_dim = cache, teacher_dim
        self._feats: OrderedDict[int, torch.Tensor] = OrderedDict()  # a few files' features (LRU): all of a
        #                                                 large set would not fit (14k files x 256 dims: 1 GB)

    def __getitem__(self, req):
        item = super().__getitem__(req)
        if self.cache is not None:
            if req.index in self._feats:
                self._feats.move_to_end(req.index)
            else:
                while len(self._feats) >= FEATURES_IN_MEMORY:
                    self._feats.popitem(last=False)
                self._feats[req.index] = self.cache.get(self.files[req.index], self.frame, self.sample_rate)
            feats = self._feats[req.index].float()
            frames = self.segment // self.frame
            piece = feats[item["start_frame"]: item["start_frame"] + frames]
            mask = torch.zeros(frames)
            mask[:piece.shape[0]] = 1.0
            item["teacher"] = F.pad(piece, (0, 0, 0, frames - piece.shape[0]))
            item["tmask"] = mask
        return item


def _collate(items: list[dict]) -> dict:
    out = collate_clips(items)
    if "teacher" in items[0]:
        out["teacher"] = torch.stack([i["teacher"] for i in items])
        out["tmask"] = torch.stack([i["tmask"] for i in items])
    return out


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_033 + step * 9_973 + 5) % (2**63 - 1))


def cosine_distance(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """student [B, D, F], teacher [B, F, D], mask [B, F] -> mean over valid frames of 1 - cos."""
    cos = F.cosine_similarity(student.transpose(1, 2), teacher, dim=-1)  # [B, F]
    return ((1 - cos) * mask).sum() / mask.sum().clamp_min(1.0)


class CodecTask:
    def __init__(self, cfg: CodecTrainConfig, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        if not cfg.data.paths:
            raise ConfigError("no training data: pass --data FOLDER|FILE|MANIFEST.jsonl ...")
        self.files = list_audio(cfg.data.paths)
        self.eval_files = list_audio(cfg.data.eval_paths) if cfg.data.eval_paths else self.files
        self.weights = cfg.losses.weights()
        self.balancer = Balancer(self.weights, cfg.losses.balancer_total_norm, cfg.losses.balancer_ema) \
            if cfg.losses.balancer else None
        self.teacher = None  # SemanticTeacher | AlignmentTeacher
        self.throughput_unit = ("audio_s", 0.0)

    # ---- construction
    def _build_mimi(self) -> Mimi:
        mcfg = self.cfg.model
        if mcfg.init:
            probe = load_mimi(mcfg.init, num_codebooks=1)
            mimi = Mimi(probe.cfg)
            mimi.load_state_dict(probe.state_dict())
            logger.info("initialised from %s", mcfg.init)
        else:
            mimi = Mimi(mcfg.mimi_config())
            if mcfg.init_scheme == "variance_preserving":
                variance_preserving_init_(mimi)
            elif mcfg.init_scheme != "torch":
                raise ConfigError(f"model.init_scheme must be variance_preserving or torch, got {mcfg.init_scheme!r}")
        mimi.set_num_codebooks(mimi.total_codebooks)
        if self.cfg.train.activation_checkpointing:
            mimi.cfg.transformer.checkpointing = True  # both latent transformers share this config
        if mcfg.weight_norm:
            apply_weight_norm(mimi)
        return mimi

    def _setup_teacher(self, env: TrainEnv, mimi: Mimi) -> FeatureCache | None:
        d = self.cfg.distill
        if not d.teacher:
            return None
        self.teacher = make_teacher(d.teacher, d.layer, env.device, d.alignment_dim)
        d.teacher_dim = self.teacher.dim
        cache = FeatureCache(Path(d.cache_dir) if d.cache_dir else self.run_dir / "teacher_cache",
                             self.teacher, self.teacher.key())
        if env.dist.is_main:  # compute every file's features once, before training
            from tqdm import tqdm
            for path in tqdm(sorted(set(self.files) | set(self.eval_files)), desc="teacher features",
                             disable=not self.cfg.train.progress):
                cache.get(path, mimi.frame_size, mimi.sample_rate)
        distributed.barrier()
        return cache

    def setup(self, env: TrainEnv) -> None:
        cfg = self.cfg
        mimi = self._build_mimi()
        self.frame_size, self.sample_rate = mimi.frame_size, mimi.sample_rate
        segment = max(1, round(cfg.data.segment_seconds * mimi.frame_rate)) * mimi.frame_size
        self.throughput_unit = ("audio_s", segment / mimi.sample_rate)
        cache = self._setup_teacher(env, mimi)
        self.codec = TrainableMimi(mimi, self.teacher.dim if self.teacher else 0).to(env.device).train()
        self.disc = MultiScaleSTFTDiscriminator(cfg.discriminator).to(env.device).train()
        self.codec_fwd, self.disc_fwd = env.wrap(self.codec), env.wrap(self.disc)
        self.mel = MultiScaleMelLoss(mimi.sample_rate).to(env.device)
        decay, plain = [], []
        for name, p in self.codec.named_parameters():
            (decay if "transformer." in name else plain).append(p)
        o = cfg.optim
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                      {"params": plain, "weight_decay": 0.0}], lr=o.lr, betas=tuple(o.betas))
        self.disc_opt = torch.optim.AdamW(self.disc.parameters(), lr=o.disc_lr, betas=tuple(o.disc_betas),
                                          weight_decay=0.0)
        warm = max(0, o.warmup_steps)

        def ramp(step: int) -> float:
            return min(1.0, (step + 1) / warm) if warm else 1.0

        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, ramp)
        self.disc_sched = torch.optim.lr_scheduler.LambdaLR(self.disc_opt, ramp)
        teacher_dim = self.teacher.dim if self.teacher else 0
        # Teacher features come from the cache only inside the loader (no model in the workers).
        loader_cache = FeatureCache(cache.root, None, cache.teacher_key) if cache else None
        self.data = _ClipsWithTeacher(self.files, segment, mimi.frame_size, mimi.sample_rate, cfg.train.seed,
                                      cache=loader_cache, teacher_dim=teacher_dim)
        self.eval_cache = cache

    # ---- the Task protocol
    def models(self) -> dict[str, nn.Module]:
        return {"codec": self.codec, "discriminator": self.disc}

    def ema_models(self) -> list[str]:
        return ["codec"]

    def optimizers(self) -> dict:
        return {"codec": self.opt, "discriminator": self.disc_opt}

    def schedulers(self) -> dict:
        return {"codec": self.sched, "discriminator": self.disc_sched}

    def grad_clip(self) -> dict[str, float]:
        return {"codec": self.cfg.optim.grad_clip, "discriminator": self.cfg.optim.disc_grad_clip}

    def dataset(self):
        return self.data

    def collate(self):
        return _collate

    def train_step(self, batch: dict, env: TrainEnv) -> dict[str, torch.Tensor | float]:
        cfg, dev = self.cfg, env.device
        step = env.step + 1
        wav = batch["wav"].to(dev)
        unquantized = batch["u"][:, 0] >= cfg.model.quantization_rate
        gen = step_generator(cfg.train.seed, step)
        n_rest = self.codec.mimi.total_codebooks - self.codec.mimi.quantizer.n_q_semantic
        n_acoustic = int(torch.randint(1, n_rest + 1, (1,), generator=gen)) if cfg.model.q_dropout else n_rest
        wav_hat, q, semantic = self.codec_fwd(wav, unquantized, n_acoustic, gen)
        out: dict[str, torch.Tensor | float] = {"bandwidth_kbps": q.bandwidth.detach(),
                                                "quantized_share": 1.0 - unquantized.float().mean()}
        for key in ("rvq_entropy", "rvq_expired"):
            if key in q.metrics:
                out[key] = q.metrics[key].detach()
        adversarial = step > cfg.losses.adv_start
        w = dict(self.weights)
        if not adversarial:
            w["adv"] = w["feat"] = 0.0
        # Discriminator: one forward over real and generated audio.
        if adversarial and step % cfg.losses.disc_every == 0:
            logits, _ = self.disc_fwd(torch.cat([wav, wav_hat.detach()]))
            d_loss = hinge_discriminator([lg[:wav.shape[0]] for lg in logits], [lg[wav.shape[0]:] for lg in logits])
            env.backward(d_loss)
            out["d_loss"] = d_loss.detach()
        # Codec losses: the discriminator is frozen and used without its DDP wrapper (no gradient for it).
        losses: dict[str, torch.Tensor] = {}
        if w["adv"] or w["feat"]:
            self.disc.requires_grad_(False)
            fake_logits, fake_feats = self.disc(wav_hat)
            with torch.no_grad():
                _, real_feats = self.disc(wav)
            self.disc.requires_grad_(True)
            losses["adv"] = hinge_generator(fake_logits)
            losses["feat"] = feature_matching(real_feats, fake_feats)
        losses["l1"] = F.l1_loss(wav_hat, wav)
        if w["msspec"]:
            losses["msspec"] = self.mel(wav_hat, wav)
        side = cfg.losses.commitment * q.penalty
        out["commit"] = q.penalty.detach()
        if semantic is not None:
            distill = cosine_distance(semantic, batch["teacher"].to(dev), batch["tmask"].to(dev))
            side = side + cfg.losses.distill * distill
            out["distill"] = distill.detach()
        active = {k: v for k, v in losses.items() if w.get(k)}
        weighted = sum(w[k] * v for k, v in active.items())
        if self.balancer is not None and active:
            self.balancer.weights = {k: w[k] for k in active}
            grad, norms = self.balancer.gradient(active, wav_hat)
            for k, n in norms.items():
                out[f"grad_norm_{k}"] = n
            # The balanced gradient is per item, O(1) whatever the batch: scaled so that averaging over
            # processes and micro-batches sums over the global batch, as one process without accumulation does.
            grad = grad * (env.dist.world_size * env.micro_batches)
            env.backward_tensors([wav_hat, side], [grad, None])
        else:
            env.backward(weighted + side)
        for k, v in losses.items():
            out[k] = v.detach()
        out["loss"] = (weighted + side).detach()
        return out

    # ---- evaluation and export
    def _eval_batch(self) -> tuple[torch.Tensor, list[Path]]:
        n = min(self.cfg.data.eval_items, len(self.eval_files))
        length = max(1, round(self.cfg.data.eval_seconds * self.sample_rate / self.frame_size)) * self.frame_size
        wavs = []
        for path in self.eval_files[:n]:
            wav = load_audio(path, self.sample_rate).wav[0, :length]
            wavs.append(F.pad(wav, (0, length - wav.shape[-1])))
        return torch.stack(wavs)[:, None], self.eval_files[:n]

    def evaluate(self, models: dict[str, nn.Module], env: TrainEnv) -> dict[str, float]:
        from ...eval.codec_metrics import codebook_usage, waveform_metrics
        codec: TrainableMimi = models["codec"]
        mimi = fold_weight_norm(codec.mimi).eval()
        wav, files = self._eval_batch()
        wav = wav.to(env.device)
        codes = mimi.encode(wav)
        rec = mimi.decode(codes)[..., :wav.shape[-1]]
        metrics = waveform_metrics(rec.cpu(), wav.cpu(), self.sample_rate, perceptual=True)
        usage = codebook_usage(codes.cpu(), mimi.cardinality)
        k = codes.shape[1]
        metrics["codebook_usage_mean"] = sum(usage[f"usage_{i}"] for i in range(k)) / k
        metrics["codebook_entropy_bits_mean"] = sum(usage[f"entropy_bits_{i}"] for i in range(k)) / k
        if codec.distill_proj is not None and self.eval_cache is not None:
            semantic = codec.distill_proj(mimi.quantizer.decode(codes[:, :1]))
            feats = [self.eval_cache.get(p, self.frame_size, self.sample_rate).float()[:codes.shape[-1]] for p in files]
            frames = codes.shape[-1]
            teacher = torch.stack([F.pad(f, (0, 0, 0, frames - f.shape[0])) for f in feats]).to(env.device)
            mask = torch.stack([(torch.arange(frames) < f.shape[0]).float() for f in feats]).to(env.device)
            metrics["teacher_cosine"] = 1.0 - float(cosine_distance(semantic, teacher, mask))
        self._write_samples(wav.cpu(), rec.cpu(), env.step)
        return metrics

    def _write_samples(self, wav: torch.Tensor, rec: torch.Tensor, step: int) -> None:
        out = self.run_dir / "samples" / f"step_{step:08d}"
        out.mkdir(parents=True, exist_ok=True)
        for i in range(wav.shape[0]):
            save_wav(out / f"item{i}_input.wav", wav[i], self.sample_rate)
            save_wav(out / f"item{i}_output.wav", rec[i], self.sample_rate)
        try:
            from .figures import spectrogram_pair
            spectrogram_pair(wav, rec, self.sample_rate, out / "spectrograms.png")
        except ImportError:
            logger.info("matplotlib is not installed: no spectrogram figures")

    def export(self, models: dict[str, nn.Module], out_dir: Path) -> None:
        codec: TrainableMimi = models["codec"]
        export_mimi(codec.mimi, out_dir, codec.mimi.cfg)
        if codec.distill_proj is not None:
            torch.save(codec.distill_proj.state_dict(), out_dir / "distill_projection.pt")

    # ---- state beyond models and optimizers
    def _codebooks(self) -> list:
        return [m for m in self.codec.modules() if hasattr(m, "_steps_to_check")]

    def state_dict(self) -> dict:
        return {"balancer": self.balancer.state_dict() if self.balancer else {},
                "codebook_counters": [m._steps_to_check for m in self._codebooks()]}

    def load_state_dict(self, state: dict) -> None:
        if self.balancer is not None:
            self.balancer.load_state_dict(state.get("balancer", {}))
        for m, n in zip(self._codebooks(), state.get("codebook_counters", [])):
            m._steps_to_check = n
