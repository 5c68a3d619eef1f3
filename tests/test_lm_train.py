"""LM training: the loss against hand-computed values, LoRA in Kyutai's format (ours and the reference load it
with the same logits), every stage's loss falls, `openmoshi eval lm`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import soundfile as sf
import torch
from dialogue_utils import make_dialogue
from lm_utils import kyutai_kwargs, random_codes, small_config

from openmoshi.bundle import init_model, load_tokenizer
from openmoshi.cli.main import main
from openmoshi.lm.loading import load_lm
from openmoshi.lm.model import LMModel, LMOutput
from openmoshi.train.lm.config import LMTrainConfig
from openmoshi.train.lm.lora import LoRAConfig, add_lora
from openmoshi.train.lm.loss import LMLossConfig, lm_loss
from openmoshi.train.lm.task import export_model

TOKENIZER = Path(__file__).resolve().parents[1] / "openmoshi" / "lm" / "assets" / "tokenizer_tiny.model"


def test_loss_weights_against_hand_computation():
    torch.manual_seed(0)
    B, T, V, card, dep_q = 1, 3, 5, 4, 2
    text_logits = torch.randn(B, 1, T, V)
    audio_logits = torch.randn(B, dep_q, T, card)
    audio_logits[:, 1, 2] = float("nan")  # the delayed codebook's last step has no prediction
    text_mask = torch.ones(B, 1, T, dtype=torch.bool)
    audio_mask = torch.ones(B, dep_q, T, dtype=torch.bool)
    audio_mask[:, 1, 2] = False
    codes = torch.tensor([[[3, 1, 0], [1, 2, 3], [0, 0, 1], [3, 3, 3]]])  # text, cb0, cb1, a user codebook
    out = LMOutput(text_logits, text_mask, audio_logits, audio_mask)
    loss, metrics = lm_loss(out, codes, LMLossConfig(), pad_ids=(3, 0))

    def ce(logits, target):
        return -torch.log_softmax(logits, -1)[target].item()

    text = [ce(text_logits[0, 0, t], codes[0, 0, t]) for t in range(T)]
    text_w = [0.5, 1.0, 0.5]  # PAD and EPAD targets count half
    expected_text = sum(w * c for w, c in zip(text_w, text)) / sum(text_w)
    cb0 = [ce(audio_logits[0, 0, t], codes[0, 1, t]) for t in range(T)]
    cb1 = [ce(audio_logits[0, 1, t], codes[0, 2, t]) for t in range(2)]
    expected_audio = (100 * sum(cb0) + sum(cb1)) / (100 * 3 + 2)
    assert loss.item() == pytest.approx(expected_text + expected_audio, rel=1e-5)
    assert metrics["text_ce"].item() == pytest.approx(sum(text) / 3, rel=1e-5)
    assert metrics["ce_cb1"].item() == pytest.approx(sum(cb1) / 2, rel=1e-5)
    assert metrics["text_pad_frac"].item() == pytest.approx(2 / 3)
    custom = LMLossConfig(semantic_weight=1.0, pad_weight=1.0, text_weight=2.0)
    loss2, _ = lm_loss(out, codes, custom, pad_ids=(3, 0))
    assert loss2.item() == pytest.approx(2 * sum(text) / 3 + (sum(cb0) + sum(cb1)) / 5, rel=1e-5)


@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory) -> tuple[Path, LMModel, torch.Tensor]:
    """A LoRA-adapted small model with trained-looking (random, non-zero) adapters, exported to a folder."""
    torch.manual_seed(0)
    cfg = small_config(text_card=1000)
    lm = LMModel(cfg).eval()
    add_lora(lm, LoRAConfig(rank=4, scaling=2.0, targets=["self_attn", "gating", "linears"]))
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    run_cfg = LMTrainConfig()
    run_cfg.lora = LoRAConfig(rank=4, scaling=2.0)
    folder = export_model(lm, tmp_path_factory.mktemp("lora") / "model", None, load_tokenizer(TOKENIZER), run_cfg)
    codes = random_codes(cfg, batch=2, steps=12)
    with torch.no_grad():
        logits = lm(codes)
    return folder, logits, codes


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.nan_to_num(), b.nan_to_num()
    return ((a - b).abs().max() / b.abs().max()).item()


@torch.no_grad()
def test_lora_export_loads_in_openmoshi_with_the_training_logits(lora_folder):
    folder, trained, codes = lora_folder
    raw = json.loads((folder / "config.json").read_text())
    assert raw["lora"] is True and raw["lora_rank"] == 4 and raw["lora_scaling"] == 2.0
    from openmoshi.checkpoint import read_safetensors
    lora = read_safetensors(folder / "lora.safetensors")
    assert "transformer.layers.0.self_attn.in_projs.0.lora_A.weight" in lora
    assert "depformer.layers.0.self_attn.out_projs.7.lora_B.weight" in lora  # per-step weight sets
    assert lora["text_linear.lora_B.weight"].abs().max() == 0  # not a target: a zero pair, as Kyutai expects one
    assert set(read_safetensors(folder / "model.safetensors")) == set(LMModel(load_lm(folder).cfg).state_dict())
    ours = load_lm(folder)(codes)
    assert _close(ours.text_logits, trained.text_logits) < 1e-5
    assert _close(ours.audio_logits, trained.audio_logits) < 1e-5


@pytest.mark.slow  # imports and builds Kyutai's model
@torch.no_grad()
def test_lora_export_loads_in_reference_moshi_with_our_logits(lora_folder):
    pytest.importorskip("moshi")
    from moshi.models.loaders import get_moshi_lm
    folder, trained, codes = lora_folder
    raw = json.loads((folder / "config.json").read_text())
    kwargs = kyutai_kwargs(load_lm(folder).cfg)
    kwargs.update(lora=raw["lora"], lora_rank=raw["lora_rank"], lora_scaling=raw["lora_scaling"])
    ref = get_moshi_lm(folder / "model.safetensors", kwargs, device="cpu", dtype=torch.float32,
                       lora_weights=folder / "lora.safetensors", fuse_lora=True)
    theirs = ref(codes)
    assert _close(trained.text_logits, theirs.text_logits) < 1e-4
    assert _close(trained.audio_logits, theirs.logits) < 1e-4


# ---- short training runs on a tiny dialogue, mono speech and text


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("lmdata")
    model = init_model("tiny", folder / "model", seed=1)
    manifest, _ = make_dialogue(folder / "dialogue", "talk", moshi=[("hello", 0.32), ("there", 1.2)],
                                user=[("yes", 0.9)], duration=1.6)
    wav, _ = sf.read(folder / "dialogue" / "talk.wav", dtype="float32")
    mono = folder / "mono"
    mono.mkdir()
    sf.write(mono / "speech.wav", wav[:, 0], 24_000)
    (mono / "speech.json").write_text((folder / "dialogue" / "talk.json").read_text())
    (mono / "speech.jsonl").write_text(json.dumps({"path": "speech.wav", "duration": 1.6}) + "\n")
    text = folder / "corpus.jsonl"
    text.write_text("\n".join(json.dumps({"text": "hello there, how are you? I am fine."}) for _ in range(8)))
    codes = folder / "codes"
    for data in (manifest, mono / "speech.jsonl"):
        assert main(["data", "encode", "--model", str(model), "--data", str(data), "--out", str(codes),
                     "--quiet", "--threads", "1"]) == 0
    return {"model": model, "dialogue": manifest, "mono": mono / "speech.jsonl", "text": text, "codes": codes}


def _train(out: Path, *args: str) -> list[dict]:
    argv = ["train", "lm", *args, "--out", str(out), "--threads", "1", "--set", "train.progress=false",
            "--set", "train.log_every=1", "--set", "train.tensorboard=false", "--set", "train.plots=false",
            "--set", "optim.warmup_steps=0"]
    assert main(argv) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _train_losses(metrics: list[dict], key: str = "loss") -> list[float]:
    return [m[key] for m in metrics if m["split"] == "train" and key in m]


@pytest.mark.slow  # three short runs
def test_finetune_and_multistream_losses_fall(corpus, tmp_path):
    common = ["--init", str(corpus["model"]), "--data", str(corpus["dialogue"]), "--codes", str(corpus["codes"]),
              "--duration", "1.6", "--batch-size", "2", "--max-steps", "8", "--lr", "3e-3", "--eval-every", "0"]
    ft = _train_losses(_train(tmp_path / "ft", "--stage", "finetune", *common))
    assert ft[-1] < 0.8 * ft[0]
    ms = _train_losses(_train(tmp_path / "ms", "--stage", "multistream", *common))
    assert ms[-1] < 0.8 * ms[0]
    lora = _train(tmp_path / "lora", "--stage", "finetune", *common, "--lora-rank", "8", "--set", "optim.lr=1e-2")
    assert _train_losses(lora)[-1] < 0.9 * _train_losses(lora)[0]
    assert (tmp_path / "lora" / "model" / "lora.safetensors").is_file()
    evals = [m for m in lora if m["split"] == "eval"]
    assert evals and {"text_ce", "text_bpb", "ce_cb0", "acc_cb7", "text_pad_frac"} <= set(evals[-1])


def test_audio_stage_alternates_text_batches_and_uses_delay_2(corpus, tmp_path):
    metrics = _train(tmp_path / "audio", "--stage", "audio", "--init", str(corpus["model"]), "--data",
                     str(corpus["mono"]), "--text-data", str(corpus["text"]), "--codes", str(corpus["codes"]),
                     "--duration", "1.6", "--batch-size", "2", "--max-steps", "12", "--lr", "3e-3",
                     "--eval-every", "0")
    audio, text = _train_losses(metrics), _train_losses(metrics, "textonly_loss")
    assert len(audio) == 6 and len(text) == 6  # every other step is a text-only batch
    assert audio[-1] < 0.8 * audio[0] and text[-1] < 0.8 * text[0]
    delays = json.loads((tmp_path / "audio" / "model" / "config.json").read_text())["delays"]
    assert delays == [0, 0] + [2] * 7 + [0] + [2] * 7


def test_text_stage_from_scratch_then_eval_lm(corpus, tmp_path, capsys):
    metrics = _train(tmp_path / "text", "--stage", "text", "--preset", "tiny", "--data", str(corpus["text"]),
                     "--duration", "1.6", "--batch-size", "2", "--max-steps", "8", "--lr", "3e-3", "--eval-every", "0")
    losses = _train_losses(metrics)
    assert losses[-1] < 0.8 * losses[0]
    model = tmp_path / "text" / "model"
    capsys.readouterr()
    assert main(["eval", "lm", "--model", str(model), "--data", str(corpus["text"]), "--duration", "1.6",
                 "--json", "--threads", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["text_bpb"] > 0 and math.isfinite(result["text_ce"]) and "audio_ce" not in result
    assert main(["eval", "lm", "--model", str(model), "--data", str(corpus["dialogue"]), "--duration", "1.6",
                 "--threads", "1"]) == 0
    table = capsys.readouterr().out
    assert "ce_cb0" in table and "text_pad_frac" in table


def test_user_text_head_transcribes_the_user_and_is_not_exported(corpus, tmp_path):
    from safetensors import safe_open

    from openmoshi.data.order import ItemRequest
    from openmoshi.train.lm.config import stage_config
    from openmoshi.train.lm.task import LMTask
    # the target row: the user's "yes" (0.9 s -> frame 11) 0.24 s (3 frames) late, EPAD on the frame before
    cfg = stage_config("finetune")
    cfg.model.init, cfg.data.data, cfg.data.codes, cfg.data.duration = \
        str(corpus["model"]), [str(corpus["dialogue"])], str(corpus["codes"]), 1.6
    cfg.loss.user_text_weight = 1.0
    task = LMTask(cfg)
    task._build(torch.device("cpu"))
    task._build_data()
    grid, is_text = task.dataset()[ItemRequest(serial=0, index=0)]
    lm_cfg, tok = task.lm.cfg, load_tokenizer(task.tokenizer_path)
    assert not is_text and grid.shape == (lm_cfg.num_codebooks + 1, 20)
    row = grid[-1].tolist()
    yes = tok.encode("yes")
    assert row[14:14 + len(yes)] == yes and row[13] == lm_cfg.existing_text_end_padding_id
    assert row[:3] == [-1] * 3 and set(row[3:13]) == {lm_cfg.existing_text_padding_id}  # late: no token at first

    metrics = _train(tmp_path / "aux", "--stage", "finetune", "--init", str(corpus["model"]), "--data",
                     str(corpus["dialogue"]), "--codes", str(corpus["codes"]), "--duration", "1.6", "--batch-size",
                     "2", "--max-steps", "8", "--lr", "3e-3", "--eval-every", "0",
                     "--set", "loss.user_text_weight=1.0")
    aux = _train_losses(metrics, "user_text_ce")
    assert len(aux) == 8 and aux[-1] < 0.8 * aux[0]
    with safe_open(tmp_path / "aux" / "model" / "model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if "user_text" in k]
    assert load_lm(tmp_path / "aux" / "model") is not None


def test_user_embeddings_can_start_as_copies_of_moshis(corpus):
    from openmoshi.train.lm.config import stage_config
    from openmoshi.train.lm.task import LMTask
    cfg = stage_config("multistream")
    cfg.model.init, cfg.model.user_emb_from_moshi = str(corpus["model"]), True
    task = LMTask(cfg)
    task._build(torch.device("cpu"))
    lm = task.lm
    assert not torch.equal(lm.emb[0].weight, lm.emb[1].weight)
    for k in range(lm.cfg.n_user):
        assert torch.equal(lm.emb[lm.cfg.dep_q + k].weight, lm.emb[k].weight)


def test_text_delay_moves_moshis_words_ahead_of_its_audio(corpus):
    from openmoshi.data.order import ItemRequest
    from openmoshi.train.lm.config import stage_config
    from openmoshi.train.lm.task import LMTask
    rows = {}
    for delay in (0.0, 0.16):
        cfg = stage_config("finetune")
        cfg.model.init, cfg.data.data, cfg.data.codes, cfg.data.duration = \
            str(corpus["model"]), [str(corpus["dialogue"])], str(corpus["codes"]), 1.6
        cfg.data.text_delay = delay
        task = LMTask(cfg)
        task._build(torch.device("cpu"))
        task._build_data()
        grid, _ = task.dataset()[ItemRequest(serial=0, index=0)]
        rows[delay] = grid[0].tolist()
    # "hello" at 0.32 s starts on frame 4 (EPAD on 3); 0.16 s (2 frames) early: frame 2
    assert rows[0.0][2:] == rows[0.16][:-2]
    assert rows[0.0][4] == rows[0.16][2] and rows[0.16][1] == 0  # EPAD
