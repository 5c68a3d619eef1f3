"""Frame-by-frame generation with a Moshi LM: the user's audio codes in, Moshi's text and audio codes out.

Tokens live in a small ring buffer indexed by model position (see `openmoshi.lm.delays`). At each step the
user's codes of the new frame are written at `offset + delay`, the tokens of position `offset - 1` are fed to
the temporal transformer, the text token and then the dep_q audio codes are sampled, and the grid is read
back `max_delay` steps late so every returned frame has all its streams (delays undone).

As in Kyutai's LMGen, step s reads the user's codes of frame s beside Moshi's tokens of frame s - 1: compared
with a teacher-forced pass over frame-aligned codes, the user stream is one frame ahead (and the user's
frame 0 is never read).
"""

from __future__ import annotations

import contextlib
import logging
import typing as tp
from dataclasses import dataclass

import torch

from ..lm.model import UNGENERATED, LMModel
from .sampling import sample_token

logger = logging.getLogger(__name__)

LogitsHook = tp.Callable[[torch.Tensor], torch.Tensor | None]


@dataclass
class _GenState:
    batch_size: int
    cache: torch.Tensor  # [B, K, CT] long, token grid by model position modulo CT
    offsets: torch.Tensor  # [B] long, model steps taken by each batch item since its (re)start
    initial: torch.Tensor  # [1, K, 1] long, tokens fed before position 0
    delays: torch.Tensor  # [K] long
    everyone: torch.Tensor  # [B] bool, all True (resets the depth transformer at each frame)
    active: torch.Tensor  # [B] bool, items that step() advances (see set_active)
    text_rng: torch.Generator | None
    audio_rng: torch.Generator | None
    steps: int = 0  # steps since the start or the last full reset (host side: no sync to decide on None)
    all_active: bool = True  # host-side summary of `active`: the common case costs nothing
    frozen: list[bool] | None = None  # host-side: items set_active() froze (they draw no random numbers)
    hidden: torch.Tensor | None = None  # [B, 1, dim] temporal output of the last step
    slots: list["SlotSampling | None"] | None = None  # per-item settings, once configure_slot() was used
    sum_condition: torch.Tensor | None = None  # [B or 2B, 1, dim] fused conditions (conditioned models)
    cross: torch.Tensor | None = None  # [B or 2B, S, dim] cross-attention source
    masked_until: torch.Tensor | None = None  # [B] long, CFG's null branch hides inputs up to this step


@dataclass
class SlotSampling:
    """Sampling settings and random streams of one batch item (e.g. one server session)."""

    temp: float
    top_k: int
    temp_text: float
    top_k_text: int
    text_rng: torch.Generator
    audio_rng: torch.Generator


class Generator:
    """Streaming sampler over an `LMModel`, step semantics equal to Kyutai's LMGen.

    Temperatures <= 0 mean greedy (argmax). `seed` seeds two generators, one for text and one for audio
    (`text_seed` / `audio_seed` override each); None uses torch's global generator. `text_logits_hook`
    receives the text logits [B, text_card_out] (float32) of each step and may return replacements
    (e.g. a padding bonus for TTS). `text_hook` gets the sampled text tokens [B] and may return the tokens to
    use instead (the TTS state machine), before the depth transformer; `audio_hook` likewise gets the audio
    codes [B, dep_q] (-1 = no token).

    Conditioned models (TTS, Hibiki) take `conditions` (embedded by `lm.condition_provider`). Classifier-free
    guidance (`cfg_coef` != 1) runs each item twice: conditions then hold 2B rows, the B real ones then the B
    null ones; logits are null + cfg_coef * (cond - null). `cfg_null_text` hides the text from the null branch
    (and then uses the conditioned text logits as they are); `cfg_masked_until` [B] hides the inputs up to
    that step from it (an audio prompt).

        gen = Generator(lm)
        with gen.streaming(batch_size=1):
            for frame in user_frames:          # long [B, n_q - dep_q, 1]
                out = gen.step(frame)          # None for the first max(delays) steps,
                                               # then long [B, 1 + dep_q, 1]: text token, audio codes
    """

    def __init__(self, lm: LMModel, temp: float = 0.8, temp_text: float = 0.7, top_k: int = 250,
                 top_k_text: int = 25, top_p: float = 0.0, top_p_text: float = 0.0, seed: int | None = None,
                 text_seed: int | None = None, audio_seed: int | None = None,
                 text_logits_hook: LogitsHook | None = None, text_hook: LogitsHook | None = None,
                 audio_hook: LogitsHook | None = None, conditions: dict | None = None, cfg_coef: float = 1.0,
                 cfg_null_text: bool = False, cfg_masked_until: list[int] | None = None) -> None:
        if lm.training:
            logger.debug("Generator: switching the LM to eval mode")
            lm.eval()
        self.lm = lm
        self.cfg = lm.cfg
        self.temp, self.temp_text = temp, temp_text
        self.top_k, self.top_k_text = top_k, top_k_text
        self.top_p, self.top_p_text = top_p, top_p_text
        self.text_seed = text_seed if text_seed is not None else seed
        self.audio_seed = audio_seed if audio_seed is not None else (None if seed is None else seed + 1)
        self.text_logits_hook = text_logits_hook
        self.text_hook, self.audio_hook = text_hook, audio_hook
        self.conditions = conditions
        self.cfg_coef = float(cfg_coef)
        self.cfg_null_text = cfg_null_text
        self.cfg_masked_until = cfg_masked_until
        self._copies = 1 if self.cfg_coef == 1.0 else 2  # model rows per item (CFG: conditioned + null)
        self._state: _GenState | None = None
        cfg = self.cfg
        self.max_delay = cfg.max_delay
        self.n_user = cfg.n_user
        self.dep_q = cfg.dep_q
        # Live positions span [offset - max_delay, offset + max_delay]: this size never overwrites one in use.
        self._ring = 2 * self.max_delay + 2
        self._depth_streams = lm.depformer is not None and lm.depformer.layers[0].self_attn.capacity > 0

    # ---- session
    @property
    def is_streaming(self) -> bool:
        return self._state is not None

    @contextlib.contextmanager
    def streaming(self, batch_size: int) -> tp.Iterator[Generator]:
        """Start a generation session of `batch_size` conversations; state lives until the block ends."""
        if self._state is not None:
            raise RuntimeError("this Generator is already streaming; end the current `with` block first")
        lm, cfg = self.lm, self.cfg
        device = lm.device
        sum_condition, cross = lm.fused_conditions(self.conditions)
        rows = batch_size * self._copies
        for name, value in (("sum", sum_condition), ("cross", cross)):
            if value is not None and value.shape[0] != rows:
                raise ValueError(f"the {name} conditions have {value.shape[0]} rows, expected {rows} "
                                 f"(batch {batch_size}{' x 2 for CFG' if self._copies == 2 else ''})")
        masked_until = None
        if self.cfg_masked_until is not None:
            if len(self.cfg_masked_until) != batch_size:
                raise ValueError(f"cfg_masked_until lists {len(self.cfg_masked_until)} steps for {batch_size} items")
            masked_until = torch.tensor(self.cfg_masked_until, dtype=torch.long, device=device)
        with contextlib.ExitStack() as stack:
            stack.enter_context(lm.streaming(rows))
            if self._depth_streams:
                stack.enter_context(lm.depformer.streaming(rows))
            self._state = _GenState(
                batch_size=batch_size,
                cache=torch.full((batch_size, cfg.num_codebooks, self._ring), UNGENERATED, dtype=torch.long,
                                 device=device),
                offsets=torch.zeros(batch_size, dtype=torch.long, device=device),
                initial=lm.initial_tokens(1),
                delays=torch.tensor(cfg.delays, dtype=torch.long, device=device),
                everyone=torch.ones(batch_size, dtype=torch.bool, device=device),
                active=torch.ones(batch_size, dtype=torch.bool, device=device),
                text_rng=self._rng(self.text_seed), audio_rng=self._rng(self.audio_seed),
                sum_condition=sum_condition, cross=cross, masked_until=masked_until)
            try:
                yield self
            finally:
                self._state = None

    def configure_slot(self, index: int, temp: float | None = None, top_k: int | None = None,
                       temp_text: float | None = None, top_k_text: int | None = None,
                       text_seed: int | None = None, audio_seed: int | None = None) -> None:
        """Give batch item `index` its own sampling settings and random streams (None = generator default,
        random seed). Items with their own streams sample independently of the rest of the batch, so a
        conversation's result never depends on who shares the batch."""
        st = self._require_state()
        if not 0 <= index < st.batch_size:
            raise ValueError(f"slot {index} is outside the batch of {st.batch_size}")
        if st.slots is None:
            st.slots = [None] * st.batch_size

        def rng(seed: int | None) -> torch.Generator:
            gen = torch.Generator(device=self.lm.device)
            if seed is None:
                gen.seed()
            else:
                gen.manual_seed(seed)
            return gen

        st.slots[index] = SlotSampling(
            temp=self.temp if temp is None else temp, top_k=self.top_k if top_k is None else top_k,
            temp_text=self.temp_text if temp_text is None else temp_text,
            top_k_text=self.top_k_text if top_k_text is None else top_k_text,
            text_rng=rng(text_seed), audio_rng=rng(audio_seed))

    def set_conditions(self, index: int, conditions: dict) -> None:
        """Give batch item `index` its own conditions (embedded by `lm.condition_provider` for one item, with its
        null row under CFG), e.g. a server session's voice. The cross-attention source keeps its length."""
        st = self._require_state()
        if not 0 <= index < st.batch_size:
            raise ValueError(f"slot {index} is outside the batch of {st.batch_size}")
        sum_condition, cross = self.lm.fused_conditions(conditions)
        rows = [index, st.batch_size + index][:self._copies]
        for name, new, old in (("sum", sum_condition, st.sum_condition), ("cross", cross, st.cross)):
            if (new is None) != (old is None):
                raise ValueError(f"the {name} conditions of slot {index} do not match the batch's")
            if new is None:
                continue
            if new.shape[0] != self._copies or new.shape[1:] != old.shape[1:]:
                raise ValueError(f"the {name} conditions of slot {index} have shape {tuple(new.shape)}, the "
                                 f"batch's rows {tuple(old.shape[1:])}")
            if name == "cross":  # a new tensor: the layers' cached keys and values of the old one are dropped
                old = st.cross = old.clone()
            old[rows] = new.to(old)

    def _sample(self, st: _GenState, logits: torch.Tensor, text: bool,
                skip: list[bool] | None = None) -> torch.Tensor:
        """Sample [B, V] logits with the generator's settings, or row by row for configured slots (then rows
        frozen by set_active, or in `skip`, draw nothing: their random streams stay where they were)."""
        if st.slots is None:
            if text:
                return sample_token(logits, self.temp_text, self.top_k_text, self.top_p_text, generator=st.text_rng)
            return sample_token(logits, self.temp, self.top_k, self.top_p, generator=st.audio_rng)
        rows = []
        for i, slot in enumerate(st.slots):
            row = logits[i:i + 1]
            if (st.frozen is not None and st.frozen[i]) or (skip is not None and skip[i]):
                rows.append(torch.zeros(1, dtype=torch.long, device=logits.device))
                continue
            if slot is None:
                temp, top_k, top_p, rng = (self.temp_text, self.top_k_text, self.top_p_text, st.text_rng) if text \
                    else (self.temp, self.top_k, self.top_p, st.audio_rng)
            elif text:
                temp, top_k, top_p, rng = slot.temp_text, slot.top_k_text, self.top_p_text, slot.text_rng
            else:
                temp, top_k, top_p, rng = slot.temp, slot.top_k, self.top_p, slot.audio_rng
            rows.append(sample_token(row, temp, top_k, top_p, generator=rng))
        return torch.cat(rows)

    def _rng(self, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        rng = torch.Generator(device=self.lm.device)
        rng.manual_seed(seed)
        return rng

    def _require_state(self) -> _GenState:
        if self._state is None:
            raise RuntimeError("call step()/reset() inside `with generator.streaming(batch_size):`")
        return self._state

    def reset(self, mask: torch.Tensor | None = None) -> None:
        """Restart the conversations where mask [B] (bool) is True (all when None); the others go on unchanged.

        A restarted item returns UNGENERATED (-2) tokens for its first max(delays) steps.
        """
        st = self._require_state()
        if mask is None:
            mask = st.everyone
            st.steps = 0
        mask = mask.to(device=st.offsets.device, dtype=torch.bool)
        if mask.shape != (st.batch_size,):
            raise ValueError(f"reset mask must have shape [{st.batch_size}], got {tuple(mask.shape)}")
        st.offsets.masked_fill_(mask, 0)
        st.cache.masked_fill_(mask.view(-1, 1, 1), UNGENERATED)
        self.lm.reset_streaming(mask.repeat(self._copies))

    def set_active(self, mask: torch.Tensor | None) -> None:
        """Advance only the items where mask [B] is True in the next steps (None = all).

        The others keep their state exactly, and step() returns -2 for them: a batch can serve
        conversations whose audio arrives at different times.
        """
        st = self._require_state()
        if mask is None:
            st.active.fill_(True)
            st.all_active = True
            st.frozen = None
        else:
            if mask.shape != (st.batch_size,):
                raise ValueError(f"active mask must have shape [{st.batch_size}], got {tuple(mask.shape)}")
            st.active.copy_(mask.to(device=st.active.device, dtype=torch.bool))
            st.all_active = False
            st.frozen = (~mask.bool()).cpu().tolist()
        self.lm.set_active(None if mask is None else mask.to(st.active.device, torch.bool).repeat(self._copies))

    # ---- one frame
    @torch.no_grad()
    def step(self, user_codes: torch.Tensor | None = None, force_text: torch.Tensor | None = None,
             force_audio: torch.Tensor | None = None, replace_audio: torch.Tensor | None = None,
             replace_rows: list[bool] | None = None) -> torch.Tensor | None:
        """Advance every conversation by one 80 ms frame.

        user_codes: long [B, n_q - dep_q, 1], the user's codes of this frame (extra codebooks are ignored;
            None for models without a user stream).
        force_text: long [B] (or [B, 1, 1]): the text token to use instead of sampling, -1 = sample.
        force_audio: long [B, dep_q] (or [B, dep_q, 1]): audio codes to use instead of sampling, -1 = sample;
            a forced code is also what the next codebook is conditioned on.
        replace_audio: long [B, dep_q]: audio codes to use without running the depth transformer (-1 allowed:
            no token), e.g. while a TTS model's audio is still delayed; with `replace_rows` [B] only for those
            items (the others are sampled, and the replaced ones draw no random numbers).
        Forced tokens are in model time: they replace what this step samples, before delays are undone.

        Returns None for the first max(delays) steps, then long [B, 1 + dep_q, 1]: Moshi's text token and
        audio codes of one frame, with the delays undone (-2 for items restarted less than max(delays) ago).
        """
        st = self._require_state()
        lm, cfg = self.lm, self.cfg
        B = st.batch_size
        ring = self._ring
        if self.n_user:
            user = self._check_user(user_codes, B)
            write = ((st.offsets[:, None] + st.delays[1 + self.dep_q:]) % ring)[..., None]  # [B, n_user, 1]
            user_slots = st.cache[:, 1 + self.dep_q:]
            user_slots.scatter_(2, write, self._keep_inactive(st, user, user_slots.gather(2, write)))

        # Feed position offset - 1: held at ring slot offset % ring (tokens are written one position ahead).
        read = (st.offsets % ring).view(B, 1, 1).expand(B, cfg.num_codebooks, 1)
        tokens = st.cache.gather(2, read)
        is_init = (st.offsets[:, None] <= st.delays)[..., None]  # [B, K, 1]
        if not st.all_active:  # frozen items get the initial tokens: always valid, and their result is dropped
            is_init = is_init | ~st.active.view(B, 1, 1)
        tokens = torch.where(is_init, st.initial, tokens)
        if self._copies == 2:
            tokens = torch.cat([tokens, self._null_inputs(st, tokens, is_init)])
        hidden, text_logits = lm.forward_text(tokens, st.sum_condition, st.cross)
        text_logits = text_logits[:, 0, 0].float()
        if self._copies == 2:
            cond, null = text_logits.chunk(2)
            text_logits = cond if self.cfg_null_text else null + (cond - null) * self.cfg_coef
        if self.text_logits_hook is not None:
            replaced = self.text_logits_hook(text_logits)
            text_logits = text_logits if replaced is None else replaced
        text = self._sample(st, text_logits, text=True)
        if force_text is not None:
            text = _forced(text, force_text.reshape(B))
        if self.text_hook is not None:
            replaced = self.text_hook(text)
            text = text if replaced is None else replaced.to(text)
        if replace_audio is not None and (replace_rows is None or all(replace_rows)):
            audio = replace_audio.reshape(B, self.dep_q).to(text)
        else:
            audio = self._sample_audio(st, hidden, text, force_audio, replace_rows)
            if replace_audio is not None and replace_rows is not None and any(replace_rows):
                rows = torch.tensor(replace_rows, device=audio.device).view(B, 1)
                audio = torch.where(rows, replace_audio.reshape(B, self.dep_q).to(audio), audio)
        if self.audio_hook is not None:
            replaced = self.audio_hook(audio)
            audio = audio if replaced is None else replaced.to(audio)

        st.offsets.copy_(self._keep_inactive(st, st.offsets + 1, st.offsets))
        write = (st.offsets % ring).view(B, 1, 1).expand(B, 1 + self.dep_q, 1)
        generated = st.cache[:, :1 + self.dep_q]
        new = torch.cat([text[:, None], audio], dim=1)[..., None]  # [B, 1 + dep_q, 1]
        generated.scatter_(2, write, self._keep_inactive(st, new, generated.gather(2, write)))
        st.steps += 1
        st.hidden = hidden[:B]
        if st.steps <= self.max_delay:
            return None
        index = (st.offsets[:, None] - self.max_delay + st.delays[:1 + self.dep_q]) % ring  # [B, 1 + dep_q]
        out = st.cache[:, :1 + self.dep_q].gather(2, index[..., None])
        missing = st.offsets <= self.max_delay
        if not st.all_active:
            missing = missing | ~st.active
        return out.masked_fill(missing.view(B, 1, 1), UNGENERATED)

    def _null_inputs(self, st: _GenState, tokens: torch.Tensor, is_init: torch.Tensor) -> torch.Tensor:
        """The inputs of CFG's null branch: tokens [B, K, 1] with the hidden parts set to -1 (no token)."""
        null = tokens
        if st.masked_until is not None:
            limit = st.delays.view(1, -1, 1) + st.masked_until.view(-1, 1, 1)
            hidden = (st.offsets.view(-1, 1, 1) <= limit) & ~is_init
            null = torch.where(hidden, torch.full_like(null, -1), null)
        if self.cfg_null_text:
            text = torch.where(is_init[:, :1], null[:, :1], torch.full_like(null[:, :1], -1))
            null = torch.cat([text, null[:, 1:]], dim=1)
        return null

    @staticmethod
    def _keep_inactive(st: _GenState, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        if st.all_active:
            return new
        return torch.where(st.active.view(-1, *([1] * (new.dim() - 1))), new, old)

    def _check_user(self, user_codes: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        if user_codes is None:
            raise ValueError(f"this model takes the user's audio: step(user_codes) with shape "
                             f"[{batch_size}, {self.n_user}, 1]")
        if user_codes.dim() != 3 or user_codes.shape[0] != batch_size or user_codes.shape[1] < self.n_user \
                or user_codes.shape[2] != 1:
            raise ValueError(f"user_codes must have shape [{batch_size}, {self.n_user}, 1], "
                             f"got {tuple(user_codes.shape)}")
        return user_codes[:, :self.n_user].to(device=self.lm.device, dtype=torch.long)

    def _sample_audio(self, st: _GenState, hidden: torch.Tensor, text: torch.Tensor,
                      force_audio: torch.Tensor | None, skip: list[bool] | None = None) -> torch.Tensor:
        """Run the depth transformer codebook by codebook -> long [B, dep_q]."""
        B = st.batch_size
        if not self.dep_q:
            return text.new_zeros(B, 0)
        lm = self.lm
        forced = None if force_audio is None else force_audio.reshape(B, self.dep_q).to(text.device)
        if self._depth_streams:
            lm.depformer.reset_streaming(st.everyone if self._copies == 1 else st.everyone.repeat(self._copies))
        copies = self._copies
        prev = text
        codes: list[torch.Tensor] = []
        for k in range(self.dep_q):
            if self._depth_streams:
                logits = lm.depth_step(k, hidden, prev.repeat(copies))
            else:
                logits = lm.depth_logits_recompute(hidden, torch.stack([text, *codes], dim=1).repeat(copies, 1))
            if copies == 2:
                cond, null = logits.chunk(2)
                logits = null + (cond - null) * self.cfg_coef
            code = self._sample(st, logits.float(), text=False, skip=skip)
            if forced is not None:
                code = _forced(code, forced[:, k])
            codes.append(code)
            prev = code
        return torch.stack(codes, dim=1)

    def extra_heads(self) -> list[torch.Tensor]:
        """Probabilities of the LM's extra heads at the last step: list of [B, extra_heads_dim]."""
        st = self._require_state()
        if st.hidden is None:
            raise RuntimeError("extra_heads() needs at least one step()")
        return [p[:, -1] for p in self.lm.extra_head_probs(st.hidden)]


def _forced(sampled: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
    forced = forced.to(device=sampled.device, dtype=torch.long)
    return torch.where(forced >= 0, forced, sampled)
