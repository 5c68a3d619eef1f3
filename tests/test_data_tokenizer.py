"""SentencePiece tokenizer training: Kyutai's special ids, Helium's options, inputs from text and data sets."""

from __future__ import annotations

import json

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from openmoshi.cli.main import main
from openmoshi.data.synth.scripts import FACTS, number_words
from openmoshi.errors import ConfigError

CORPUS = [q + " " + a for q, a in FACTS] + [f"{number_words(n)} is written {n}." for n in range(200)]


def test_tokenizer_ids_and_options(tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(CORPUS * 3) + "\n")
    data = tmp_path / "set"
    (data / "d").mkdir(parents=True)
    (data / "d" / "x.json").write_text(json.dumps({"alignments": [["Hello", [0, 0.5], "SPEAKER_MAIN"],
                                                                  ["there.", [0.5, 1], "SPEAKER_MAIN"],
                                                                  ["Hi!", [1.2, 1.5], "SPEAKER_USER"]]}))
    (data / "train.jsonl").write_text(json.dumps({"path": "d/x.wav", "duration": 2.0}) + "\n")
    out = tmp_path / "tok" / "tokenizer.model"
    assert main(["data", "tokenizer", "--input", str(text), str(data), "--out", str(out),
                 "--vocab-size", "600"]) == 0
    assert "EPAD id 0 = <unk>, PAD id 3 = <pad>" in capsys.readouterr().out
    sp = spm.SentencePieceProcessor(model_file=str(out))
    assert [sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert sp.pad_id() == 3 and sp.unk_id() == 0
    assert 300 <= sp.get_piece_size() <= 600
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(out.read_bytes())
    spec = proto.trainer_spec
    assert spec.model_type == sentencepiece_model_pb2.TrainerSpec.UNIGRAM
    assert spec.split_digits and spec.byte_fallback
    # digits are single tokens; unseen characters fall back to bytes, never to <unk>
    pieces = sp.encode("it costs 1234 euros", out_type=str)
    assert [p.strip("▁") for p in pieces if any(c.isdigit() for c in p)] == ["1", "2", "3", "4"]
    ids = sp.encode("日本")
    assert 0 not in ids and sp.decode(ids) == "日本"
    assert "Hello there." in sp.decode(sp.encode("Hello there."))


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        from openmoshi.data.tokenizer import corpus_lines
        corpus_lines([tmp_path / "missing.txt"])
    (tmp_path / "c.txt").write_text("hello\n")
    assert main(["data", "tokenizer", "--input", str(tmp_path / "c.txt"), "--out", str(tmp_path / "t.txt")]) == 1
