"""Delayed-streams models on CPU: ASR real-time factor (stt-1b shape) and TTS time to first audio (tts-1.6b shape),
ours and Kyutai's reference (moshi==0.2.13) in the same run, on the same random weights, fp32.

    python benchmarks/bench_dsm.py [--threads 2] [--batch 1 8] [--asr-steps 12] [--only asr|tts] [--small] [--no-fast]

ASR: per 80 ms frame, Mimi encoding (official Mimi structure, 32 codebooks) and one LM step with the extra heads;
real-time factor = audio seconds / compute seconds (> 1 is faster than real time), median over rounds that
alternate between the two implementations. TTS: from the start of generation (conditions, voice, guidance
distilled as a condition) to the first kept audio frame decoded by Mimi: `delay_steps + 2` text steps plus the
acoustic delay, then one decode. `--small` uses the tiny presets (a smoke run).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from openmoshi.bundle import (
    ASSETS,
    MoshiBundle,
    _fill_codebooks_randomly,
    generation_defaults,
    load_tokenizer,
)
from openmoshi.codec import Mimi, mimi_official, mimi_tiny
from openmoshi.generation.generator import Generator
from openmoshi.generation.tts import Synthesizer, voice_condition
from openmoshi.lm.config import LMConfig
from openmoshi.lm.model import LMModel

_FILE_KEYS = {"model_type", "moshi_name", "mimi_name", "tokenizer_name", "mimi_config_name", "lora_name", "lora",
              "lora_rank", "lora_scaling", "lm_gen_config", "tts_config", "stt_config", "model_id"}


def reference_lm(lm: LMModel):
    from moshi.models import loaders
    kwargs = {k: v for k, v in copy.deepcopy(lm.cfg.to_kyutai()).items() if k not in _FILE_KEYS}
    with torch.device("meta"):
        ref = loaders.get_moshi_lm(None, lm_kwargs=kwargs, dtype=torch.float32, device="meta")
    ref.load_state_dict(lm.state_dict(), assign=True)  # the same tensors: no second copy of the weights
    return ref.eval()


def reference_mimi(mimi: Mimi, n_q: int):
    from moshi.models import loaders
    ref = loaders.get_mimi(None, mimi.cfg.to_kyutai(), num_codebooks=n_q)
    ref.load_state_dict({k: v for k, v in mimi.state_dict().items()}, strict=False)
    return ref.eval()


def make_mimi(small: bool, n_q: int) -> Mimi:
    import dataclasses
    cfg = mimi_tiny() if small else mimi_official()
    cfg = dataclasses.replace(cfg, quantizer=dataclasses.replace(cfg.quantizer, n_q=max(n_q, cfg.quantizer.n_q)))
    mimi = Mimi(cfg)
    _fill_codebooks_randomly(mimi, 0)
    mimi.set_num_codebooks(n_q)
    return mimi.eval()


@torch.inference_mode()
def bench_asr(small: bool, batches: list[int], steps: int, rounds: int) -> list[tuple]:
    from moshi.models.lm import LMGen
    cfg = LMConfig.tiny_stt() if small else LMConfig.stt_1b()
    torch.manual_seed(0)
    lm = LMModel(cfg).eval()
    ref = reference_lm(lm)
    mimi = make_mimi(small, 32)
    ref_mimi = reference_mimi(mimi, 32)
    rows = []
    for batch in batches:
        pcm = torch.randn(batch, 1, 1920) * 0.1
        timings: dict[str, list[float]] = {"openmoshi": [], "moshi 0.2.13": []}
        ours_gen = Generator(lm, temp=0, temp_text=0)
        ref_gen = LMGen(ref, temp=0, temp_text=0)
        with mimi.streaming(batch), ours_gen.streaming(batch), ref_mimi.streaming(batch), ref_gen.streaming(batch):
            def ours_step() -> None:
                ours_gen.step(mimi.encode(pcm))
                ours_gen.extra_heads()

            def ref_step() -> None:
                ref_gen.step_with_extra_heads(ref_mimi.encode(pcm))

            for fn in (ours_step, ref_step):  # warm up
                fn()
                fn()
            for _ in range(rounds):
                for name, fn in (("openmoshi", ours_step), ("moshi 0.2.13", ref_step)):
                    start = time.perf_counter()
                    for _ in range(steps):
                        fn()
                    timings[name].append(steps * 0.08 * batch / (time.perf_counter() - start))
        rows.append(("ASR RTF (audio s / s, all streams)", batch,
                     statistics.median(timings["openmoshi"]), statistics.median(timings["moshi 0.2.13"])))
    return rows


@torch.inference_mode()
def bench_tts(small: bool, batches: list[int], rounds: int) -> list[tuple]:
    from moshi.conditioners import ConditionAttributes, TensorCondition
    from moshi.models import tts as ref_tts
    cfg = LMConfig.tiny_tts() if small else LMConfig.tts_1_6b()
    torch.manual_seed(0)
    lm = LMModel(cfg).eval()
    ref = reference_lm(lm)
    mimi = make_mimi(small, cfg.n_q)
    ref_mimi = reference_mimi(mimi, cfg.n_q)
    tokenizer = load_tokenizer(ASSETS / "tokenizer_tiny.model")
    bundle = MoshiBundle(mimi, lm, tokenizer, cfg, generation_defaults(cfg))
    voice_dim = cfg.conditioners["speaker_wavs"]["tensor"]["dim"]
    delay = int(cfg.tts_config["audio_delay"] * 12.5)
    steps = delay + 2 + cfg.max_delay + 1  # the first kept audio frame comes out of this step
    text = "Hello there, this is a benchmark of the time to first audio."
    rows = []
    for batch in batches:
        voices = [voice_condition(torch.randn(1, voice_dim, 10)) for _ in range(batch)]
        synth = Synthesizer(bundle, temp=0.6, cfg_coef=2.0, max_steps=steps)
        machine = ref_tts.StateMachine(ref_tts.TokenIds(cfg.text_card + 1), second_stream_ahead=2)
        ref_model = ref_tts.TTSModel(lm=ref, mimi=ref_mimi, tokenizer=tokenizer, voice_suffix="", voice_repo="",
                                     machine=machine, delay_steps=delay, n_q=cfg.n_q, temp=0.6, max_gen_length=steps)

        def ours() -> None:
            run = synth.generate([synth.words(text)] * batch, voices)
            with mimi.streaming(batch):
                mimi.decode(run.frames[:, 1:, -1:].clamp(min=0))

        def theirs() -> None:
            entries = [ref_model.prepare_script([text], padding_between=1)] * batch
            attrs = [ConditionAttributes(text={"control": "ok", "cfg": "2.0"},
                                         tensor={"speaker_wavs": TensorCondition(v.tensor, v.mask)}) for v in voices]
            result = ref_model.generate(entries, attrs)
            with ref_mimi.streaming(batch):
                ref_mimi.decode(result.frames[-1][:, 1:].clamp(min=0))

        ours()
        theirs()
        timings: dict[str, list[float]] = {"openmoshi": [], "moshi 0.2.13": []}
        for _ in range(rounds):
            for name, fn in (("openmoshi", ours), ("moshi 0.2.13", theirs)):
                start = time.perf_counter()
                fn()
                timings[name].append(time.perf_counter() - start)
        rows.append((f"TTS time to first audio (s, {steps} steps)", batch,
                     statistics.median(timings["openmoshi"]), statistics.median(timings["moshi 0.2.13"])))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--asr-steps", type=int, default=12, help="frames per ASR round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=["asr", "tts"], default=None)
    parser.add_argument("--small", action="store_true", help="tiny presets instead of the real shapes")
    parser.add_argument("--no-fast", action="store_true",
                        help="ours with torch's stock matmuls (openmoshi.nn.fast off), to compare")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.no_fast:
        from openmoshi.nn import fast
        fast.set_enabled(False)
    rows = []
    if args.only in (None, "asr"):
        rows += bench_asr(args.small, args.batch, args.asr_steps, args.rounds)
    if args.only in (None, "tts"):
        rows += bench_tts(args.small, args.batch, args.rounds)
    print(f"\n{'measure':44} {'batch':>5} {'openmoshi':>10} {'moshi 0.2.13':>13}")
    for name, batch, ours, ref in rows:
        print(f"{name:44} {batch:>5} {ours:>10.3f} {ref:>13.3f}")


if __name__ == "__main__":
    main()
