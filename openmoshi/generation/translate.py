"""Streaming speech translation with Kyutai's Hibiki: source speech in, translated speech and text out.

Fed as Kyutai's moshi.run_inference feeds it: the first frame twice, then the source frame by frame; after
the source one frame whose codes are all `card` (end of input), then silence until the model writes the
text EOS. Hibiki is conditioned on a `description` ("very_good"; "very_bad" for the null branch of
classifier-free guidance). An EOS sampled before the end of the input is read as PAD (see `load_lm`).
"""

from __future__ import annotations

import typing as tp
from dataclasses import dataclass

import torch

from ..bundle import MoshiBundle
from ..errors import ConfigError
from .generator import Generator
from .transcript import Transcript, transcript_from_tokens


@dataclass
class Translation:
    audio: torch.Tensor  # float [1, T] at 24 kHz
    transcript: Transcript  # the translated text, timed on the output audio
    finished: bool  # False when max_extra_s ran out before the model ended


def hibiki_conditions(bundle: MoshiBundle, batch_size: int, cfg_coef: float) -> dict | None:
    provider = bundle.lm.condition_provider
    if provider is None:
        return None
    names = set(provider.conditioners)
    if names != {"description"}:
        raise ConfigError(f"a Hibiki model is conditioned on 'description'; this one on {sorted(names)}")
    values = ["very_good"] * batch_size + (["very_bad"] * batch_size if cfg_coef != 1.0 else [])
    with torch.no_grad():
        return provider(text={"description": values})


def translate_recordings(bundle: MoshiBundle, wavs: list[torch.Tensor], cfg_coef: float = 1.0,
                         generation: dict | None = None, seed: int | None = None, max_extra_s: float = 10.0,
                         on_step: tp.Callable[[int], None] | None = None) -> list[Translation]:
    """Translate recordings (float [1, T] each, 24 kHz) as one batch; shorter ones are padded with silence."""
    mimi, lm, cfg = bundle.mimi, bundle.lm, bundle.config
    if cfg.dep_q == 0 or cfg.n_user == 0:
        raise ConfigError("translation needs a model that hears and speaks (a Hibiki model)")
    if cfg_coef != 1.0 and lm.condition_provider is None:
        raise ConfigError("this model has no conditioners: classifier-free guidance needs them (--cfg-coef 1)")
    batch, frame = len(wavs), mimi.frame_size
    frames = max(w.shape[-1] // frame for w in wavs)
    if frames < 1:
        raise ConfigError("the recordings are shorter than one 80 ms frame")
    pcm = torch.zeros(batch, 1, frames * frame)
    for i, w in enumerate(wavs):
        n = min(w.shape[-1], frames * frame)
        pcm[i, :, :n] = w[..., :n]
    pcm = pcm.to(lm.device)
    gen = Generator(lm, seed=seed, conditions=hibiki_conditions(bundle, batch, cfg_coef), cfg_coef=cfg_coef,
                    **(generation if generation is not None else bundle.generation))
    eos = bundle.tokenizer.eos_id()
    texts: list[list[int]] = [[] for _ in range(batch)]
    audio: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    done = [False] * batch
    limit = frames + 1 + int(max_extra_s * mimi.frame_rate)
    with torch.inference_mode(), mimi.streaming(batch), gen.streaming(batch):
        for index in range(limit):
            if index < frames:
                codes = mimi.encode(pcm[..., index * frame:(index + 1) * frame])
            elif index == frames:  # end of the source: every codebook at `card`
                codes = torch.full((batch, gen.n_user, 1), cfg.card, dtype=torch.long, device=lm.device)
            else:
                codes = mimi.encode(torch.zeros(batch, 1, frame, device=lm.device))
            if index == 0:
                gen.step(codes[:, :gen.n_user])
            out = gen.step(codes[:, :gen.n_user])
            if on_step is not None:
                on_step(index + 1)
            if out is None:
                continue
            wav = mimi.decode(out[:, 1:].clamp(min=0)).float().cpu()
            for b in range(batch):
                if done[b]:
                    continue
                token = int(out[b, 0, 0])
                texts[b].append(token)
                audio[b].append(wav[b])
                if token == eos and index >= frames:  # an EOS after the end-of-input frame ends it
                    done[b] = True
            if all(done):
                break
    pad_ids = (cfg.existing_text_padding_id, cfg.existing_text_end_padding_id)
    return [Translation(torch.cat(a, dim=-1) if a else torch.zeros(1, 0),
                        transcript_from_tokens(t, bundle.tokenizer, mimi.frame_rate, pad_ids), d)
            for a, t, d in zip(audio, texts, done)]
