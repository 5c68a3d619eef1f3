"""LM training data: manifests and alignments in moshi-finetune's format, crops, token grids, codec-keyed shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf
import torch
from dialogue_utils import make_dialogue

from openmoshi.bundle import init_model, load_codec, load_tokenizer
from openmoshi.cli.main import main
from openmoshi.data.codes import CodeShards, codec_key, encode_channels
from openmoshi.data.interleave import InterleaveConfig, parse_alignments, text_stream
from openmoshi.data.lm_dataset import AudioLMDataset, TextLMDataset
from openmoshi.data.sources import AudioItem, DataError, read_channels, read_manifest
from openmoshi.lm.config import LMConfig

TOKENIZER = Path(__file__).resolve().parents[1] / "openmoshi" / "lm" / "assets" / "tokenizer_tiny.model"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return init_model("tiny", tmp_path_factory.mktemp("model") / "tiny", seed=1)


@pytest.fixture(scope="module")
def dialogue(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dialogue")
    manifest, _ = make_dialogue(folder, "talk", moshi=[("hello", 0.32), ("there", 1.6)],
                                user=[("yes", 1.0), ("okay", 2.4)], duration=3.2)
    # a mono file in the same manifest: speech of one stream, every speaker's words in the text
    wav, _ = sf.read(folder / "talk.wav", dtype="float32")
    sf.write(folder / "mono.wav", wav[:, 0], 24_000)
    (folder / "mono.json").write_text((folder / "talk.json").read_text())
    with manifest.open("a") as f:
        f.write(json.dumps({"path": "mono.wav", "duration": 3.2}) + "\n")
    return manifest


def test_manifest_and_channels(dialogue):
    items = read_manifest(dialogue)
    assert [i.path.name for i in items] == ["talk.wav", "mono.wav"]
    assert read_manifest(dialogue.parent)[0].path == items[0].path  # a folder of manifests
    wav = read_channels(items[0].path, start=0.8, duration=3.2)
    assert wav.shape == (2, int(3.2 * 24_000))
    assert wav[:, int(2.4 * 24_000):].abs().max() == 0  # zero-padded past the file's end
    with pytest.raises(DataError, match="duration"):
        bad = dialogue.parent / "bad.jsonl"
        bad.write_text('{"path": "talk.wav"}\n')
        read_manifest(bad)


def test_dialogue_grid_rows(model, dialogue):
    mimi = load_codec(model)
    cfg = LMConfig.tiny()
    tok = load_tokenizer(TOKENIZER)
    items = read_manifest(dialogue)
    data = AudioLMDataset(items, cfg, tok, duration=1.6, mimi=mimi)
    assert len(data) == 4 and data.frames == 20  # two 1.6 s crops per file
    grid = data[1]  # talk.wav from 1.6 s: "there" at crop time 0 on channel 0
    assert grid.shape == (17, 20) and grid.dtype == torch.long
    codes = encode_channels(mimi, read_channels(items[0].path, 1.6, 1.68))  # one frame more: the user's is ahead
    assert torch.equal(grid[1:9], codes[0, :8, :20]) and torch.equal(grid[9:], codes[1, :8, 1:21])
    words = parse_alignments(json.loads(items[0].alignments_path.read_text()))
    expected = text_stream(words, tok, 1.6, 20, InterleaveConfig(), speakers="main")
    assert grid[0].tolist() == expected and expected[:2] == tok.encode("there")[:2]
    # the user's "okay" (channel 1, 0.8 s into the crop) is not in Moshi's text
    assert expected != text_stream(words, tok, 1.6, 20, InterleaveConfig(), speakers="all")
    mono = data[2]  # mono speech: no user audio, every speaker's words
    assert (mono[9:] == -1).all()
    assert mono[0].tolist() == text_stream(words, tok, 0.0, 20, InterleaveConfig(), speakers="all")


def test_user_augmentation_hook_changes_only_the_user_channel(model, dialogue):
    mimi = load_codec(model)
    items = read_manifest(dialogue)[:1]
    calls = []

    def louder(user, moshi, sample_rate, gen):
        calls.append((user.shape, moshi.shape, sample_rate))
        return torch.randn(user.shape, generator=gen)  # the user buried in loud noise

    plain = AudioLMDataset(items, LMConfig.tiny(), load_tokenizer(TOKENIZER), 1.6, mimi=mimi)
    aug = AudioLMDataset(items, LMConfig.tiny(), load_tokenizer(TOKENIZER), 1.6, mimi=mimi, user_augment=louder)
    a, b = plain[0], aug[0]
    assert calls == [((1, 40_320), (1, 40_320), 24_000)]  # the crop and one frame more (the user's is ahead)
    assert torch.equal(a[:9], b[:9]) and not torch.equal(a[9:], b[9:])
    assert torch.equal(aug[0], b)  # seeded: the same crop gets the same augmentation


def test_encode_shards_keyed_by_codec(model, dialogue, tmp_path):
    out = tmp_path / "codes"
    assert main(["data", "encode", "--model", str(model), "--data", str(dialogue), "--out", str(out),
                 "--quiet"]) == 0
    mimi = load_codec(model)
    key = codec_key(mimi)
    shards = CodeShards(out, key)
    item = read_manifest(dialogue)[0]
    whole = encode_channels(mimi, read_channels(item.path))
    assert torch.equal(shards.codes(item), whole)
    data = AudioLMDataset([item], LMConfig.tiny(), load_tokenizer(TOKENIZER), 1.6, shards=shards)
    assert torch.equal(data[1][1:9], whole[0, :8, 20:40]) and torch.equal(data[1][9:, :19], whole[1, :8, 21:40])
    assert (data[1][9:, 19] == -1).all()  # the user's frame after the end of the file: no input
    # another codec (other weights) has another key, and finds no codes here
    other = init_model("tiny", tmp_path / "other", seed=2)
    other_key = codec_key(load_codec(other))
    assert other_key != key
    with pytest.raises(DataError, match="other codecs"):
        CodeShards(out, other_key)


def test_stereo_codes_stacked_from_its_channels(model, dialogue, tmp_path):
    # the tiny-talk recipe encodes a dialogue's two mono channel files once and stacks their codes for the
    # dialogue: the same codes the codec gives the stereo file (channels are encoded independently)
    from openmoshi.data.codes import stack_channel_codes
    from openmoshi.data.format import write_manifest
    from openmoshi.data.mono import split_dialogues
    stereo_manifest = dialogue.parent / "stereo.jsonl"
    write_manifest(stereo_manifest, [(i.path.name, i.duration) for i in read_manifest(dialogue)
                                     if i.path.stem == "talk"])
    dialogue = stereo_manifest
    mono = split_dialogues(dialogue, tmp_path / "mono")
    out = tmp_path / "codes"
    assert main(["data", "encode", "--model", str(model), "--data", str(mono), "--out", str(out), "--quiet",
                 "--shard-frames", "10"]) == 0  # one shard per file: reads go across shards
    mimi = load_codec(model)
    key = codec_key(mimi)
    stereo = read_manifest(dialogue)
    files = {i.path: [tmp_path / "mono" / f"{i.path.stem}.ch{c}.wav" for c in range(2)] for i in stereo}
    assert stack_channel_codes(out, key, files) == len(stereo)
    assert stack_channel_codes(out, key, files) == 0  # already there: kept
    shards = CodeShards(out, key)
    for item in stereo:
        assert torch.equal(shards.codes(item), encode_channels(mimi, read_channels(item.path)))
    with pytest.raises(DataError, match="not in the codes"):
        stack_channel_codes(out, key, {tmp_path / "x.wav": [tmp_path / "missing.ch0.wav"]})


def test_augmented_user_channels_precomputed_and_drawn(model, dialogue, tmp_path):
    import hashlib

    from mimi_utils import fill_codebooks

    from openmoshi.data.augment import UserAugmenter
    from openmoshi.data.codes import variant_key, write_shards, write_user_variants
    from openmoshi.data.format import write_manifest
    stereo = dialogue.parent / "stereo_only.jsonl"
    write_manifest(stereo, [(i.path.name, i.duration) for i in read_manifest(dialogue) if i.path.stem == "talk"])
    item = read_manifest(stereo)[0]
    wav = read_channels(item.path)
    # the command line: clean codes and two augmented user channels per dialogue, counted in the index
    out = tmp_path / "codes"
    assert main(["data", "encode", "--model", str(model), "--data", str(stereo), "--out", str(out), "--quiet",
                 "--user-variants", "2", "--augment-seed", "5"]) == 0
    shards = CodeShards(out, codec_key(load_codec(model)))
    assert shards.user_variants(item) == 2 and shards.codes_with_user_variant(item, 2).shape == shards.codes(item).shape
    # a codec whose codebooks were filled from the speech (a random one gives the same codes for any input)
    mimi = load_codec(model)
    fill_codebooks(mimi, wav[:, None])
    out = tmp_path / "codes_filled"
    write_shards(mimi, [item], out)
    write_user_variants(mimi, [item], out, 2, seed=5)
    shards = CodeShards(out, codec_key(mimi))
    clean = encode_channels(mimi, wav)
    base = int.from_bytes(hashlib.sha1(item.path.name.encode()).digest()[:6], "little")
    augmented, _ = UserAugmenter(seed=5)(wav, index=base * 1_000 + 2)
    v2 = shards.codes_with_user_variant(item, 2)  # the augmenter's output for (seed 5, this file, 2), encoded
    assert torch.equal(v2[0], clean[0]) and torch.equal(v2[1], encode_channels(mimi, augmented[1:2])[0])
    assert not torch.equal(v2[1], clean[1]) and not torch.equal(v2, shards.codes_with_user_variant(item, 1))
    # training draws one of the three user channels per item, from the item's generator; Moshi's rows stay
    data = AudioLMDataset([item], LMConfig.tiny(), load_tokenizer(TOKENIZER), 1.6, shards=shards,
                          user_variants=True)
    grids = [data.item(0, gen=torch.Generator().manual_seed(s)) for s in range(12)]
    # (the three versions differ over the file, asserted above; on the cropped window two of them can encode
    # alike, as on AVX-512 CPUs, whose float rounding differs: so at least two versions are drawn)
    assert len({tuple(g[9:].flatten().tolist()) for g in grids}) >= 2
    assert all(torch.equal(g[:9], grids[0][:9]) for g in grids)
    # resumable: a rerun adds nothing, a larger count adds only the new versions
    before = json.loads((shards.folder / "index.json").read_text())["items"]
    write_user_variants(mimi, [item], out, 2, seed=5)
    assert json.loads((shards.folder / "index.json").read_text())["items"] == before
    write_user_variants(mimi, [item], out, 3, seed=5)
    after = json.loads((shards.folder / "index.json").read_text())["items"]
    assert set(after) - set(before) == {variant_key(item.path, 3)} and all(after[k] == v for k, v in before.items())
    # asked for but never computed, or for mono speech: clear errors
    bare = tmp_path / "bare"
    write_shards(mimi, [item], bare)
    plain = AudioLMDataset([item], LMConfig.tiny(), load_tokenizer(TOKENIZER), 1.6,
                           shards=CodeShards(bare, codec_key(mimi)), user_variants=True)
    with pytest.raises(DataError, match="--user-variants"):
        plain[0]
    with pytest.raises(DataError, match="stereo dialogues"):
        write_user_variants(mimi, [i for i in read_manifest(dialogue) if i.path.stem == "mono"], out, 1)


def test_text_corpus(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"the cat number {i} sat on the mat"}) for i in range(20)))
    tok = load_tokenizer(TOKENIZER)
    data = TextLMDataset.from_path(corpus, LMConfig.tiny(), tok, frames=16)
    grid = data[0]
    assert grid.shape == (17, 16) and (grid[1:] == -1).all()
    assert grid[0, :8].tolist() == tok.encode("the cat number 0 sat on the mat")[:8]
    assert data.bytes_per_token > 1
    with pytest.raises(DataError):
        AudioLMDataset([AudioItem(tmp_path / "x.wav", 1.0)], LMConfig.tiny(), tok, 1.0)


def test_code_shards_read_items_alone(tmp_path):
    """Items spread over many shards read back exactly (each from its own bytes), and a shard cut short or
    missing is a DataError naming the file, not a crash."""
    from safetensors.torch import load_file

    from openmoshi.checkpoint import safetensors_index
    from openmoshi.data.codes import _ShardWriter

    gen = torch.Generator().manual_seed(0)
    writer = _ShardWriter(tmp_path, "mimi-test", shard_frames=30)
    written = {}
    for i in range(12):
        codes = torch.randint(-1, 2048, (1 + i % 2, 4, 5 + 3 * i), generator=gen)
        written[f"/audio/{i}.wav"] = codes
        writer.add(f"/audio/{i}.wav", codes)
    writer.add("/audio/empty.wav", torch.zeros(1, 4, 0, dtype=torch.long))
    writer.flush()
    shards = CodeShards(tmp_path, "mimi-test")
    files = sorted((tmp_path / "mimi-test").glob("shard-*.safetensors"))
    assert len(files) > 3
    for _ in range(2):  # a second pass reads the cached headers
        for key, codes in written.items():
            assert torch.equal(shards._load(shards.index["items"][key]).long(), codes)
    assert shards._load(shards.index["items"]["/audio/empty.wav"]).shape == (1, 4, 0)
    shard, name = shards.index["items"]["/audio/11.wav"]
    assert torch.equal(load_file(str(tmp_path / "mimi-test" / shard))[name].long(), written["/audio/11.wav"])
    index = safetensors_index(tmp_path / "mimi-test" / shard)
    last = max(index, key=lambda k: index[k].end)  # the tensor stored last in the file
    data = (tmp_path / "mimi-test" / shard).read_bytes()
    (tmp_path / "mimi-test" / shard).write_bytes(data[:-8])
    fresh = CodeShards(tmp_path, "mimi-test")
    with pytest.raises(DataError, match="ends before"):
        fresh._load([shard, last])
    (tmp_path / "mimi-test" / shard).unlink()
    with pytest.raises(DataError, match=shard):
        CodeShards(tmp_path, "mimi-test")._load([shard, name])
