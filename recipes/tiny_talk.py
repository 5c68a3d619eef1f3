"""tiny-talk: the whole training pipeline, from nothing to a small Moshi that answers spoken questions.

    python recipes/tiny_talk.py                      # runs/tiny-talk, CPU: a few hours; rerun to resume
    python recipes/tiny_talk.py --device cuda        # the same on a GPU
    python recipes/tiny_talk.py --size toy --work /tmp/tt   # every stage at toy size (seconds each), as CI does

Stages (each resumable; a finished stage is skipped on rerun, an interrupted training resumes from its last
checkpoint):
  scripts     dialogue scripts of the tiny-talk domain (openmoshi/data/synth/talk.py): greetings, questions
              over a facts table and one-digit sums, goodbyes; test dialogues in held-out phrasings
  synth       stereo dialogues (one Moshi voice, many user voices; test voices held out) + exact word timings
  mono        each channel as mono speech with its own words (audio pretraining and codec data)
  tokenizer   a 512-piece SentencePiece tokenizer of the domain's text
  codec       a tiny Mimi (2.6 M parameters, 8 x 1024 codes) trained on the mono speech, its semantic level
              distilled from the phonemes of the aligned words (--codec-teacher)
  encode      the Mimi codes of every file, once, and of augmented versions of each dialogue's user channel
  audio       LM audio pretraining on mono speech (the paper's stage 2, tiny learning rates scaled up)
  multistream LM multi-stream post-training on the dialogues (Moshi = left channel)
  finetune    LM dialogue fine-tuning, user channel augmented
  sharpen     fine-tuning continued with the text loss weighted up (x4, x10): sampled text that keeps to
              its own history ("The capital of Japan is Tokyo")
  package     WORK/model: the model folder (LM in bfloat16), what `openmoshi init --preset tiny-talk` ships
  eval        `openmoshi eval talk` of that folder on held-out voices and phrasings, and the codec's held-out
              figures; `openmoshi eval lm --listening` on the test dialogues

Every stage's wall time goes to WORK/times.json; logs to WORK/logs/STAGE.log.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the stages that run in-process import this checkout's openmoshi


@dataclass(frozen=True)
class Size:
    dialogues: int
    user_voices: int
    codec_steps: int
    codec_batch: int
    lm_steps: tuple[int, int, int]  # audio, multistream, finetune
    lm_batch: int
    duration: float  # seconds per LM training item
    eval_cases: int
    checkpoint_every: int
    lm_dialogues: int = 0  # train dialogues the LM stages use (0 = all): encoding them is the slow part on a CPU
    user_variants: int = 0  # augmented user channels encoded per dialogue (gain, noise, reverb, echo), drawn in training
    sharpen: tuple[tuple[int, float], ...] = ()  # (steps, text loss weight) of each round of the sharpen stage


SIZES = {
    "toy": Size(dialogues=6, user_voices=6, codec_steps=2, codec_batch=2, lm_steps=(2, 2, 2), lm_batch=2,
                duration=4.0, eval_cases=2, checkpoint_every=1, user_variants=1, sharpen=((1, 4.0), (1, 10.0))),
    "full": Size(dialogues=4000, user_voices=320, codec_steps=6000, codec_batch=8, lm_steps=(500, 1500, 2500),
                 lm_batch=8, duration=12.0, eval_cases=80, checkpoint_every=50, lm_dialogues=0,
                 user_variants=2, sharpen=((1200, 4.0), (1500, 10.0))),
}
# Turn-taking of the tiny-talk dialogues: Moshi answers after the question, never over it. The synth's defaults
# (telephone-like: a quarter of hand-overs overlapping, Moshi's backchannels and interruptions) taught runs 1-5 to
# start replies that begin with the subject ("Grass is green.") before the user had said it.
TURN_TAKING = {"gap": {"mean": 0.6, "std": 0.2, "low": 0.3, "high": 1.2}, "overlap_prob": 0.0,
               "user_interrupt_prob": 0.0, "moshi_interrupt_prob": 0.0, "backchannel_prob": 0.0}
LM_LR = {"audio": 1e-3, "multistream": 6e-4, "finetune": 3e-4, "sharpen": 2e-4}
USER_TEXT_WEIGHT = 2.0  # the auxiliary transcription of the user (training only)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/tiny-talk", help="work folder (rerun the same command to resume)")
    parser.add_argument("--size", choices=sorted(SIZES), default="full", help="full (the shipped model) or toy")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads of each stage (0 = every core). On a machine other jobs share, give 1: "
                             "torch's threads waiting on busy cores made a 2-core codec step 15x slower "
                             "(18 s instead of 1.2 s)")
    parser.add_argument("--until", help="stop after this stage")
    parser.add_argument("--adversarial", action=argparse.BooleanOptionalAction, default=None,
                        help="train the codec's last tenth with the discriminator (default: on GPU only)")
    parser.add_argument("--codec-teacher", default="phonemes", choices=["phonemes", "letters", "none"],
                        help="what the codec's semantic level is distilled from: the phonemes (espeak-ng) or "
                             "letters of the aligned words sounding in each frame, so that codebook 0 says what "
                             "is said whoever says it (no WavLM weights needed); none = no distillation")
    parser.add_argument("--codec-steps", type=int, help="codec training steps (default: the size's)")
    parser.add_argument("--from", dest="from_model", metavar="MODEL",
                        help="continue from a tiny-talk model folder (the shipped one: openmoshi/lm/assets/tiny-talk, "
                             "or an earlier WORK/model): its codec and tokenizer are reused (no codec training), "
                             "audio pretraining and post-training are skipped, and dialogue fine-tuning starts from "
                             "its LM. Data is made afresh (same seed: the same dialogues)")
    parser.add_argument("--steps-scale", type=float, default=1.0,
                        help="multiply every training stage's steps (e.g. 0.5 for a quicker, weaker model)")
    args = parser.parse_args(argv)
    Recipe(Path(args.work), SIZES[args.size], args).run()
    return 0


class Recipe:
    def __init__(self, work: Path, size: Size, args: argparse.Namespace) -> None:
        self.work, self.size, self.args = work, size, args
        self.data = work / "data"
        (work / "logs").mkdir(parents=True, exist_ok=True)
        self.times_path = work / "times.json"
        self.times = json.loads(self.times_path.read_text()) if self.times_path.exists() else {}
        self.source, self.source_tokenizer = self.check_source(args.from_model)  # --from (a bad one fails here)

    # ---- plumbing
    def steps(self, n: int) -> int:
        return max(1, round(n * self.args.steps_scale))

    def openmoshi(self, stage: str, *argv: str, stdout: Path | None = None) -> None:
        """Run `python -m openmoshi ARGV`, logging to WORK/logs/STAGE.log (stdout to `stdout` when given)."""
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        cmd = [sys.executable, "-m", "openmoshi", *argv]
        with open(self.work / "logs" / f"{stage}.log", "a") as log:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            out = open(stdout, "w") if stdout else log
            try:
                done = subprocess.run(cmd, stdout=out, stderr=log if stdout else subprocess.STDOUT, env=env)
            finally:
                if stdout:
                    out.close()
        if done.returncode != 0:
            raise SystemExit(f"stage {stage} failed (exit {done.returncode}); see {self.work / 'logs' / stage}.log. "
                             "Rerun the same command to resume.")

    @staticmethod
    def check_source(folder: str | None) -> tuple[Path | None, str]:
        """(the --from model folder, its tokenizer's file name), checked; (None, "") without --from."""
        if not folder:
            return None, ""
        from openmoshi.bundle import read_config
        from openmoshi.errors import OpenMoshiError
        folder = Path(folder)
        try:
            cfg = read_config(folder)[0]
        except OpenMoshiError as exc:
            raise SystemExit(f"--from {folder}: not a model folder ({exc})") from exc
        if not (folder / cfg.tokenizer_name).is_file() or not (folder / cfg.mimi_name).is_file():
            raise SystemExit(f"--from {folder}: it lacks {cfg.tokenizer_name} or {cfg.mimi_name}")
        return folder, cfg.tokenizer_name

    def run(self) -> None:
        for name in ("scripts", "synth", "mono", "tokenizer", "codec", "encode", "audio", "multistream", "finetune",
                     "sharpen", "package", "eval"):
            marker = self.work / ".done" / name
            if marker.exists():
                print(f"[tiny-talk] {name}: done")
            else:
                print(f"[tiny-talk] {name} ...", flush=True)
                start = time.time()
                getattr(self, "stage_" + name)()
                elapsed = time.time() - start
                self.times[name] = round(self.times.get(name, 0.0) + elapsed, 1)
                self.times_path.write_text(json.dumps(self.times, indent=2) + "\n")
                marker.parent.mkdir(exist_ok=True)
                marker.touch()
                print(f"[tiny-talk] {name}: {elapsed:.0f} s", flush=True)
            if name == self.args.until:
                break

    # ---- data
    def stage_scripts(self) -> None:
        from openmoshi.data.synth.talk import text_corpus, write_dialogue_scripts
        write_dialogue_scripts(self.data / "scripts.jsonl", self.size.dialogues, self.args.seed)
        (self.data / "corpus.txt").write_text("\n".join(text_corpus()) + "\n")

    def stage_synth(self) -> None:
        turns = self.data / "turn_taking.json"
        turns.write_text(json.dumps(TURN_TAKING, indent=2) + "\n")
        self.openmoshi("synth", "data", "synth", "--out", str(self.data / "dialogues"), "--script-file",
                       str(self.data / "scripts.jsonl"), "--turn-taking", str(turns),
                       "--user-voices", str(self.size.user_voices),
                       "--seed", str(self.args.seed), "--workers", str(os.cpu_count() or 1))

    def stage_mono(self) -> None:
        from openmoshi.data.mono import split_dialogues
        for split in ("train", "test"):
            split_dialogues(self.data / "dialogues" / f"{split}.jsonl", self.data / f"mono_{split}")

    def stage_tokenizer(self) -> None:
        if self.source is not None:  # the LM's text vocabulary comes with it
            shutil.copyfile(self.source / self.source_tokenizer, self.work / "tokenizer_tiny_talk.model")
            return
        self.openmoshi("tokenizer", "data", "tokenizer", "--input", str(self.data / "corpus.txt"),
                       "--out", str(self.work / "tokenizer_tiny_talk.model"), "--vocab-size", "512")

    # ---- codec
    def common(self, seed_offset: int = 0) -> list[str]:
        return ["--device", self.args.device, "--threads", str(self.args.threads), "--seed",
                str(self.args.seed + seed_offset)]

    def stage_codec(self) -> None:
        if self.source is not None:  # a model folder is a codec folder too (load_codec reads its Mimi)
            target = self.work / "codec" / "model"
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(self.source, target)
            return
        # Reconstruction losses (multi-scale mel + L1, EnCodec's balancer), then on a GPU the adversarial and
        # feature-matching terms for the last tenth of the steps. On a CPU a step with the MS-STFT discriminator
        # costs ~20 reconstruction steps (32 s against 1.5 s at batch 8 x 1 s on 2 cores), so CPU runs stay
        # reconstruction-only unless --adversarial is given.
        s = self.size
        steps = self.args.codec_steps or self.steps(s.codec_steps)
        adversarial = self.args.adversarial if self.args.adversarial is not None else self.args.device != "cpu"
        adv_start = steps - steps // 10 if adversarial else steps + 1
        teacher = [] if self.args.codec_teacher == "none" else ["--teacher", self.args.codec_teacher]
        self.openmoshi("codec", "train", "codec", "--preset", "tiny", "--data",
                       str(self.data / "mono_train" / "mono.jsonl"), "--eval-data",
                       str(self.data / "mono_test" / "mono.jsonl"), "--out", str(self.work / "codec"),
                       "--max-steps", str(steps), "--batch-size", str(s.codec_batch),
                       "--checkpoint-every", str(s.checkpoint_every), "--eval-every", str(s.checkpoint_every * 5),
                       "--set", "losses.preset=encodec", "--set", f"losses.adv_start={adv_start}",
                       *teacher, *self.common())

    def lm_manifests(self) -> tuple[Path, Path]:
        """(mono, dialogues) manifests of the LM stages: the first `lm_dialogues` train dialogues and their
        channels' mono files."""
        return self.data / "mono_train" / "mono_lm.jsonl", self.data / "dialogues" / "train_lm.jsonl"

    def stage_encode(self) -> None:
        # The codes are keyed by the codec's weights and codebook count (the LM's 4 per stream); the LM stages
        # read them instead of running Mimi. The mono files are the dialogues' channels, sample for sample, so
        # only they go through the codec and each dialogue's codes are its two channels' codes stacked.
        from openmoshi.bundle import load_codec
        from openmoshi.data.codes import codec_key, stack_channel_codes
        from openmoshi.data.format import read_manifest, write_manifest
        dialogues = read_manifest(self.data / "dialogues" / "train.jsonl")
        if self.size.lm_dialogues:
            dialogues = dialogues[:self.size.lm_dialogues]
        mono_dir = self.data / "mono_train"
        channels = {wav: [mono_dir / f"{wav.stem}.ch{c}.wav" for c in range(2)] for wav, _ in dialogues}
        mono_manifest, dialogue_manifest = self.lm_manifests()
        write_manifest(dialogue_manifest, [(os.path.relpath(wav, dialogue_manifest.parent), duration)
                                           for wav, duration in dialogues])
        write_manifest(mono_manifest, [(c.name, duration) for wav, duration in dialogues for c in channels[wav]])
        self.openmoshi("encode", "data", "encode", "--model", str(self.work / "codec" / "model"), "--codebooks",
                       "4", "--data", str(mono_manifest), "--out", str(self.work / "codes"), "--quiet",
                       "--shard-frames", "200000", "--device", self.args.device, "--threads", str(self.args.threads))
        key = codec_key(load_codec(self.work / "codec" / "model", num_codebooks=4))
        stack_channel_codes(self.work / "codes", key, channels)
        if self.size.user_variants:  # the user through other rooms and microphones (run 3 memorised its recordings)
            self.openmoshi("encode", "data", "encode", "--model", str(self.work / "codec" / "model"), "--codebooks",
                           "4", "--data", str(dialogue_manifest), "--out", str(self.work / "codes"), "--quiet",
                           "--user-variants", str(self.size.user_variants), "--augment-seed", str(self.args.seed),
                           "--shard-frames", "200000", "--device", self.args.device, "--threads",
                           str(self.args.threads))

    # ---- LM stages
    def lm_stage(self, stage: str, steps: int, data: str, init: Path | None, *extra: str, out: str = "",
                 lr: float = 0.0, warmup: int = 0, seed_offset: int = 0) -> None:
        """One LM training stage (`train lm --stage STAGE`) into WORK/lm_OUT (default: the stage's name); `init`:
        the model folder it starts from (None: the tiny_talk preset, fresh); lr default: LM_LR[stage]; warmup
        default: a twentieth of the steps."""
        s = self.size
        warmup = min(warmup, self.steps(steps)) if warmup else max(1, self.steps(steps) // 20)
        source = ["--init", str(init)] if init else [
            "--preset", "tiny_talk", "--codec", str(self.work / "codec" / "model"),
            "--tokenizer", str(self.work / "tokenizer_tiny_talk.model")]
        self.openmoshi(stage, "train", "lm", "--stage", stage, *source, "--data", data,
                       "--codes", str(self.work / "codes"), "--out", str(self.work / f"lm_{out or stage}"),
                       "--max-steps", str(self.steps(steps)), "--batch-size", str(s.lm_batch),
                       "--duration", str(s.duration), "--lr", str(lr or LM_LR[stage]),
                       "--warmup-steps", str(warmup),
                       "--checkpoint-every", str(s.checkpoint_every), "--eval-every", str(s.checkpoint_every * 5),
                       "--set", "optim.depth_lr_scale=1.0", *extra, *self.common(seed_offset))

    def stage_audio(self) -> None:
        if self.source is not None:
            return  # continuing from a trained model: its LM already went through this stage
        self.lm_stage("audio", self.size.lm_steps[0], str(self.lm_manifests()[0]), None)

    def stage_multistream(self) -> None:
        if self.source is not None:
            return
        # Listening is the hard part: run 2 (no auxiliary loss) echoed no question's subject correctly. The user's
        # tables start as copies of Moshi's (trained on the same codes in audio pretraining), and a training-only
        # head transcribes the user's words 0.24 s late, a dense signal on every word the user says.
        self.lm_stage("multistream", self.size.lm_steps[1], str(self.lm_manifests()[1]), self.work / "lm_audio" / "model",
                      "--set", "model.user_emb_from_moshi=true", "--set", f"loss.user_text_weight={USER_TEXT_WEIGHT}",
                      *self.augment())

    def stage_finetune(self) -> None:
        init = self.source or self.work / "lm_multistream" / "model"
        self.lm_stage("finetune", self.size.lm_steps[2], str(self.lm_manifests()[1]), init,
                      "--set", f"loss.user_text_weight={USER_TEXT_WEIGHT}", *self.augment())

    def sharpen_rounds(self) -> list[tuple[str, int, float]]:
        return [(f"sharpen_x{weight:g}", steps, weight) for steps, weight in self.size.sharpen]

    def stage_sharpen(self) -> None:
        # Fine-tuning continued with the text loss weighted up. The audio cross-entropy (semantic codebook x100)
        # dominates the loss, and the text it leaves is not sharp enough to sample: run 6 wrote "The capital of
        # Japan is Berlin". x4, x10, x20 took run 6's held-out answers from 2.5 % to 20 %, 30 %, 45 %; run 7 (--from
        # run 6) went 46 -> 51 -> 56 -> 57.5 -> 61 % with x40 (text sampled at 0.3). Run 8 (--from run 7, 11
        # phrasings per kind): 77.5 -> 86 -> 84 % (x4, x10), then x20 fell to 67.5 % and answered late (onset
        # 1.3 s, some questions never): with data that covers the phrasings, x10 is enough.
        init = self.work / "lm_finetune" / "model"
        for k, (name, steps, weight) in enumerate(self.sharpen_rounds()):
            self.lm_stage("finetune", steps, str(self.lm_manifests()[1]), init, "--set",
                          f"loss.user_text_weight={USER_TEXT_WEIGHT}", "--set", f"loss.text_weight={weight}",
                          *self.augment(), out=name, lr=LM_LR["sharpen"], warmup=50, seed_offset=k + 1)
            init = self.work / f"lm_{name}" / "model"

    def final_lm(self) -> Path:
        rounds = self.sharpen_rounds()
        return self.work / (f"lm_{rounds[-1][0]}" if rounds else "lm_finetune") / "model"

    def augment(self) -> list[str]:
        return ["--set", "data.augment_user=true"] if self.size.user_variants else []

    # ---- results
    def stage_eval(self) -> None:
        out = self.work / "eval"
        out.mkdir(exist_ok=True)
        model = self.work / "model"  # the packaged model, as shipped
        self.openmoshi("eval", "eval", "talk", "--model", str(model), "--cases", str(self.size.eval_cases),
                       "--voices-from", str(self.data / "dialogues"), "--codec-data", str(self.data / "mono_test"),
                       "--codec-max-files", "40", "--save-audio", str(out / "audio"), "--threads",
                       str(self.args.threads), "--json", "--quiet", stdout=out / "talk.json")
        # Listening, teacher-forced on the held-out test dialogues: the first word of each reply with the crop's own
        # user audio and with another crop's (no gap = the model answers without hearing the question)
        self.openmoshi("eval", "eval", "lm", "--model", str(model), "--data",
                       str(self.data / "dialogues" / "test.jsonl"), "--duration", str(self.size.duration),
                       "--max-items", "64", "--shuffle", "0", "--batch-size", "8", "--listening", "--threads",
                       str(self.args.threads), "--device", self.args.device, "--json", "--quiet",
                       stdout=out / "listening.json")
        report = json.loads((out / "talk.json").read_text())
        listening = json.loads((out / "listening.json").read_text())
        print(f"[tiny-talk] held-out accuracy {report['accuracy']:.0%}; full report: {out / 'talk.json'} "
              f"(table: openmoshi eval talk --model {model} --voices-from {self.data / 'dialogues'})")
        if listening.get("turn_starts"):
            print(f"[tiny-talk] first word of a reply, teacher-forced: {listening['turn_start_acc']:.0%} with the "
                  f"question heard, {listening['turn_start_acc_other_user']:.0%} with another user's audio "
                  f"({out / 'listening.json'})")
        if "word_acc" in listening:
            print(f"[tiny-talk] every word of the replies, teacher-forced: {listening['word_acc']:.0%} with the "
                  f"question heard, {listening['word_acc_other_user']:.0%} with another user's audio")

    def stage_package(self) -> None:
        from openmoshi.bundle import package_model
        target = self.work / "model"
        if target.exists():
            shutil.rmtree(target)
        package_model(self.final_lm(), target)
        size = sum(f.stat().st_size for f in target.iterdir()) / 1e6
        print(f"[tiny-talk] {target}: {size:.1f} MB; ship it with: cp {target}/* openmoshi/lm/assets/tiny-talk/")


if __name__ == "__main__":
    sys.exit(main())
