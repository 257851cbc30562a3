"""Data as users have it (CONTRACT.md section 5, slimtune/data.py): .npy and .bin token ids, .jsonl records, text
through a tokenizer.json and text as bytes; each refusal; the windows and loss masks cut from the stream, checked
against the files' contents written here; and the pages of a mapped file handed back after a draw."""

import json
import mmap
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from slimtune.data import Tokens, read_data
from slimtune.errors import DataError
from slimtune.options import FitOptions
from slimtune.train import draw_batch


def _tokenizer(tmp_path: Path, corpus: str, vocab_size: int = 300) -> Path:
    """A byte-level BPE tokenizer trained here by the `tokenizers` library on `corpus`, saved as tokenizer.json."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([corpus], trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def corpus(data_dir):
    return (data_dir / "ptb.valid.txt").read_text()[:30_000]


# ---------------------------------------------------------------- files of ids


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64, np.uint32])
def test_npy_ids_are_read_as_saved_and_mapped(tmp_path, dtype):
    ids = np.random.default_rng(0).integers(0, 1000, 5000).astype(dtype)
    np.save(tmp_path / "ids.npy", ids)
    tokens = read_data(tmp_path / "ids.npy", vocab_size=1000)
    assert tokens.mapping is not None and tokens.mask is None and tokens.n_bytes is None
    assert np.array_equal(tokens.ids.numpy(), ids)


@pytest.mark.parametrize("dtype, name", [(np.uint16, "uint16"), (np.uint32, "uint32")])
def test_bin_ids_are_read_in_the_dtype_given(tmp_path, dtype, name):
    ids = np.random.default_rng(1).integers(0, 70_000 if name == "uint32" else 60_000, 4000).astype(dtype)
    ids.tofile(tmp_path / "train.bin")
    tokens = read_data(tmp_path / "train.bin", vocab_size=70_000, data_dtype=name)
    assert np.array_equal(tokens.ids.numpy(), ids)


def test_the_windows_index_a_token_stream_as_they_index_bytes(tmp_path, data_dir):
    """The same text as bytes and as a uint16 .bin of the byte values: the same windows, at random offsets and for
    --one-step (row b at positions [b L, b L + L + 1))."""
    raw = (data_dir / "ptb.valid.txt").read_bytes()[:10_000]
    (tmp_path / "t.txt").write_bytes(raw)
    np.frombuffer(raw, dtype=np.uint8).astype(np.uint16).tofile(tmp_path / "t.bin")
    as_bytes, as_ids = read_data(tmp_path / "t.txt"), read_data(tmp_path / "t.bin")
    for one_step in (False, True):
        options = FitOptions(seq_len=100, batch_size=3, one_step=one_step)
        a, _ = draw_batch(as_bytes, options, _group(), torch.Generator().manual_seed(5))
        b, _ = draw_batch(as_ids, options, _group(), torch.Generator().manual_seed(5))
        assert torch.equal(a, b)
    first, _ = draw_batch(as_ids, FitOptions(seq_len=100, batch_size=3, one_step=True), _group(), torch.Generator())
    for row in range(3):
        assert first[row].tolist() == list(raw[row * 100 : row * 100 + 101])


def _group():
    from slimtune.distributed import Group

    return Group()


@pytest.mark.parametrize(
    "ids, vocab, found",
    [([1, 2, 700, 3], 500, "token id 700 at position 2"), ([5, -1, 3], 500, "token id -1 at position 1")],
)
def test_ids_outside_the_vocabulary_are_refused_with_their_position(tmp_path, ids, vocab, found):
    np.save(tmp_path / "ids.npy", np.array(ids, dtype=np.int32))
    with pytest.raises(DataError, match=found) as info:
        read_data(tmp_path / "ids.npy", vocab_size=vocab)
    assert info.value.params == ("data",)


def test_a_bin_read_in_the_wrong_dtype_is_refused(tmp_path):
    np.arange(5, dtype=np.uint16).tofile(tmp_path / "odd.bin")  # 10 bytes: not a whole number of uint32
    with pytest.raises(DataError, match="not a whole number of uint32 ids") as info:
        read_data(tmp_path / "odd.bin", vocab_size=300, data_dtype="uint32")
    assert "data_dtype" in info.value.params
    np.array([1, 40_000], dtype=np.uint32).tofile(tmp_path / "big.bin")  # as uint16: 1, 0, 40000, 0 -- within 65536
    with pytest.raises(DataError, match="another `data_dtype`"):
        read_data(tmp_path / "big.bin", vocab_size=300)  # 40000 as a uint16 id is beyond the vocabulary


@pytest.mark.parametrize("array", [np.zeros((3, 4), dtype=np.int32), np.zeros(10, dtype=np.float32)])
def test_an_npy_that_is_not_a_1d_integer_array_is_refused(tmp_path, array):
    np.save(tmp_path / "a.npy", array)
    with pytest.raises(DataError, match="token ids are a 1-D integer array"):
        read_data(tmp_path / "a.npy", vocab_size=300)


def test_a_mapped_file_hands_its_pages_back_after_a_draw(tmp_path):
    """The process holds a mapped file's pages only while a draw reads them (RssFile, measured)."""
    status = Path("/proc/self/status")
    if not status.exists():
        pytest.skip("no /proc/self/status")

    def rss_file() -> int:
        line = next(x for x in status.read_text().splitlines() if x.startswith("RssFile:"))
        return int(line.split()[1]) * 1024

    n = 32 * 2**20  # 64 MB of uint16 ids
    np.arange(n, dtype=np.uint64).astype(np.uint16).tofile(tmp_path / "big.bin")
    before = rss_file()
    tokens = read_data(tmp_path / "big.bin", vocab_size=65_536)
    assert rss_file() - before < 8 * 2**20  # reading and checking it mapped none of it (read a block at a time)
    total = int(tokens.ids[: n // 2].to(torch.int64).sum())  # touches half the file's pages
    assert total > 0 and rss_file() - before > 24 * 2**20
    tokens.release()
    assert rss_file() - before < 2**20


# ---------------------------------------------------------------- text and records


def test_text_for_a_model_whose_vocabulary_is_not_bytes_needs_a_tokenizer(tmp_path):
    (tmp_path / "t.txt").write_text("hello world")
    with pytest.raises(DataError, match="holds text, but the model.s vocabulary has 32000 ids") as info:
        read_data(tmp_path / "t.txt", vocab_size=32_000)
    assert set(info.value.params) == {"data", "tokenizer"}
    assert read_data(tmp_path / "t.txt").ids.tolist() == list(b"hello world")  # a byte-level model: its bytes


def test_text_through_a_tokenizer_is_what_the_tokenizer_encodes(tmp_path, corpus):
    from tokenizers import Tokenizer

    path = _tokenizer(tmp_path, corpus)
    (tmp_path / "t.txt").write_text(corpus[:5000])
    tokens = read_data(tmp_path / "t.txt", vocab_size=300, tokenizer=path)
    expected = Tokenizer.from_file(str(path)).encode(corpus[:5000], add_special_tokens=False).ids
    assert tokens.ids.tolist() == expected and len(expected) < 5000  # merged: fewer tokens than bytes
    assert tokens.n_bytes == len(corpus[:5000].encode())


def test_a_tokenizer_of_another_vocabulary_is_refused(tmp_path, corpus):
    path = _tokenizer(tmp_path, corpus, vocab_size=300)
    (tmp_path / "t.txt").write_text("some text")
    with pytest.raises(DataError, match="has 300 tokens but the model's vocabulary has 512") as info:
        read_data(tmp_path / "t.txt", vocab_size=512, tokenizer=path)
    assert info.value.params == ("tokenizer",)


def test_a_missing_tokenizers_package_is_named_with_its_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import fails as if not installed
    (tmp_path / "t.txt").write_text("x")
    with pytest.raises(DataError, match=r"slimtune\[tokenizers\]"):
        read_data(tmp_path / "t.txt", vocab_size=300, tokenizer=tmp_path / "tokenizer.json")


def _jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_records_join_into_one_stream_and_the_loss_counts_completions(tmp_path):
    records = [{"prompt": "ABC", "completion": "xy"}, {"text": "hello"}, {"prompt": "", "completion": "zz"}]
    tokens = read_data(_jsonl(tmp_path / "r.jsonl", records))
    assert tokens.ids.tolist() == list(b"ABCxyhellozz")
    assert tokens.mask.tolist() == [False] * 3 + [True] * 9  # a text record counts every token
    assert tokens.n_bytes == 12


def test_records_through_a_tokenizer_encode_prompt_and_completion_apart(tmp_path, corpus):
    from tokenizers import Tokenizer

    path = _tokenizer(tmp_path, corpus)
    tok = Tokenizer.from_file(str(path))
    records = [{"prompt": "the market fell", "completion": " sharply today"}, {"text": "and then it rose"}]
    tokens = read_data(_jsonl(tmp_path / "r.jsonl", records), vocab_size=300, tokenizer=path)
    parts = [
        tok.encode(t, add_special_tokens=False).ids for t in ("the market fell", " sharply today", "and then it rose")
    ]
    assert tokens.ids.tolist() == parts[0] + parts[1] + parts[2]
    assert tokens.mask.tolist() == [False] * len(parts[0]) + [True] * (len(parts[1]) + len(parts[2]))


def test_the_mask_follows_the_windows_drawn(tmp_path):
    """Prompts in capitals, completions in small letters: a prediction counts exactly where its target is small."""
    rng = np.random.default_rng(2)
    records = [
        {"prompt": "".join(rng.choice(list("ABCDEFG"), 7)), "completion": "".join(rng.choice(list("abcdefg"), 5))}
        for _ in range(200)
    ]
    tokens = read_data(_jsonl(tmp_path / "r.jsonl", records))
    windows, mask = draw_batch(tokens, FitOptions(seq_len=64, batch_size=4), _group(), torch.Generator().manual_seed(0))
    targets = windows[:, 1:]
    assert torch.equal(mask.bool(), (targets >= ord("a")) & (targets <= ord("g")))


@pytest.mark.parametrize(
    "line, found",
    [
        ('{"prompt": "a", "completion": ""}', "line 2: `completion` is empty"),
        ('{"text": ""}', "line 2: `text` is empty"),
        ('{"prompt": "a", "completion": "b"', "line 2: not JSON"),
        ('["a", "b"]', "line 2: a record is a JSON object"),
        ('{"prompt": "a"}', "line 2: a record has `text`, or `prompt` and `completion`"),
        ('{"text": 5}', "line 2: `text` is int, not a string"),
    ],
)
def test_a_bad_record_is_refused_naming_its_line(tmp_path, line, found):
    path = tmp_path / "r.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(DataError, match=found):
        read_data(path)


def test_a_batch_of_prompts_only_is_refused_for_one_step(tmp_path):
    tokens = read_data(_jsonl(tmp_path / "r.jsonl", [{"prompt": "A" * 300, "completion": "b"}]))
    with pytest.raises(DataError, match="hold no completion"):
        draw_batch(tokens, FitOptions(seq_len=64, one_step=True), _group(), torch.Generator())


def test_tokens_split_keeps_masks_aligned():
    ids = torch.arange(100, dtype=torch.int32)
    mask = ids % 3 == 0
    train, held = Tokens(ids, mask).split(0.2)
    assert torch.equal(train.mask, train.ids % 3 == 0) and torch.equal(held.mask, held.ids % 3 == 0)
    assert len(train) == 80 and len(held) == 20


def test_pages_per_step_are_what_a_mapped_file_costs(tmp_path):
    np.arange(100_000, dtype=np.uint16).tofile(tmp_path / "t.bin")
    tokens = read_data(tmp_path / "t.bin", vocab_size=100_000)
    assert tokens.held_bytes(4, 1025) == 4 * (1025 * 2 + 2 * mmap.PAGESIZE)
    in_memory = Tokens(torch.zeros(1000, dtype=torch.int32), torch.zeros(1000, dtype=torch.bool))
    assert in_memory.held_bytes(4, 1025) == 1000 * 4 + 1000


# ---------------------------------------------------------------- the command line


@pytest.fixture
def vocab300(tmp_path):
    from helpers import save_model, tiny_model

    path = tmp_path / "v300.safetensors"
    save_model(path, tiny_model(dtype=torch.float32, vocab_size=300, hidden_dim=32, ffn_dim=64, n_heads=2))
    return path


def _cli(args, capsys):
    from slimtune.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_fit_trains_on_token_ids_and_refuses_text_without_a_tokenizer(tmp_path, vocab300, capsys):
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(0, 300, 3000).astype(np.int32))
    out = tmp_path / "tuned.safetensors"
    common = ["--checkpoint", vocab300, "--seq-len", 64, "--chunk-size", 16, "--run-dir", "", "--json"]
    code, stdout, _ = _cli(["fit", "--data", tmp_path / "ids.npy", "--out", out, *common], capsys)
    assert code == 0 and out.exists()
    assert json.loads(stdout.strip().splitlines()[-1])["steps"] == 1
    (tmp_path / "t.txt").write_text("plain text, no tokenizer " * 50)
    refused = tmp_path / "refused.safetensors"
    code, _, err = _cli(["fit", "--data", tmp_path / "t.txt", "--out", refused, *common], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--tokenizer" in err and not refused.exists()


@pytest.mark.parametrize(
    "write, flags, found",
    [
        (lambda p: np.arange(5, dtype=np.uint16).tofile(p / "d.bin"), ["--data-dtype", "uint32"], "whole number"),
        (lambda p: np.array([1, 400], dtype=np.uint16).tofile(p / "d.bin"), [], "token id 400 at position 1"),
        (lambda p: (p / "d.jsonl").write_text('{"text": "a"}\n{"text": \n'), [], "line 2: not JSON"),
        (lambda p: (p / "d.jsonl").write_text('{"text": "a"}\n'), [], "holds text, but the model's vocabulary"),
    ],
)
def test_bad_data_exits_2_with_one_line_and_writes_nothing(tmp_path, vocab300, capsys, write, flags, found):
    from helpers import save_model, tiny_model

    write(tmp_path)
    data = next(tmp_path.glob("d.*"))
    model = vocab300
    if "JSON" in found:  # a byte-level model reads records as bytes
        save_model(model := tmp_path / "bytes.safetensors", tiny_model(dtype=torch.float32))
    out = tmp_path / "tuned.safetensors"
    args = ["fit", "--checkpoint", model, "--data", data, "--out", out, "--seq-len", 8, "--run-dir", "", *flags]
    code, _, err = _cli(args, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and found in err, err
    assert not out.exists()


def test_eval_reports_bits_per_token_and_per_byte_through_a_tokenizer(tmp_path, corpus, capsys):
    """A tokenized text: bits per token from the model, and bits per byte = the same bits over the text's bytes
    (in the share of tokens predicted), computed here from the JSON's own figures."""
    from helpers import save_model, tiny_model

    path = _tokenizer(tmp_path, corpus)
    model = tmp_path / "m.safetensors"
    save_model(model, tiny_model(dtype=torch.float32, vocab_size=300, hidden_dim=32, ffn_dim=64, n_heads=2))
    text = corpus[:4000]
    (tmp_path / "valid.txt").write_text(text)
    code, stdout, stderr = _cli(
        ["eval", "--checkpoint", model, "--data", tmp_path / "valid.txt", "--tokenizer", path, "--seq-len", 128,
         "--json"], capsys)  # fmt: skip
    assert code == 0
    result = json.loads(stdout.strip().splitlines()[-1])
    n_tokens = len(read_data(tmp_path / "valid.txt", vocab_size=300, tokenizer=path))
    bits = result["bits_per_token"] * result["predicted_bytes"]
    assert result["bits_per_byte"] == pytest.approx(bits / (len(text.encode()) * result["predicted_bytes"] / n_tokens))
    assert (
        "bits per token" in stderr and result["bits_per_byte"] < result["bits_per_token"]
    )  # --json: the line on stderr


HF_TOKENIZER = r"""
import sys, json
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)  # the folder's config names our code
print(json.dumps(tok(sys.argv[2], add_special_tokens=False)["input_ids"]))
"""


def test_an_hf_export_carries_the_tokenizer_autotokenizer_loads(tmp_path, corpus, capsys):
    """fit --format hf --tokenizer: the folder holds tokenizer.json, and transformers' AutoTokenizer loads it and
    encodes as the `tokenizers` library does."""
    import os
    import subprocess

    pytest.importorskip("transformers", reason="transformers is a test extra: pip install -e '.[test]'")
    from helpers import save_model, tiny_model
    from tokenizers import Tokenizer

    path = _tokenizer(tmp_path, corpus)
    model = tmp_path / "m.safetensors"
    save_model(model, tiny_model(dtype=torch.float32, vocab_size=300, hidden_dim=32, ffn_dim=64, n_heads=2))
    (tmp_path / "train.txt").write_text(corpus[:6000])
    folder = tmp_path / "tuned-hf"
    code, _, err = _cli(["fit", "--checkpoint", model, "--data", tmp_path / "train.txt", "--tokenizer", path,
                         "--format", "hf", "--out", folder, "--seq-len", 64, "--run-dir", ""], capsys)  # fmt: skip
    assert code == 0, err
    assert (folder / "tokenizer.json").read_bytes() == path.read_bytes()
    env = os.environ | {"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1"}
    sample = "the market rose sharply"
    run = subprocess.run([sys.executable, "-c", HF_TOKENIZER, str(folder), sample], capture_output=True, env=env,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    expected = Tokenizer.from_file(str(path)).encode(sample, add_special_tokens=False).ids
    assert json.loads(run.stdout.decode().strip().splitlines()[-1]) == expected


def test_generate_through_a_tokenizer_continues_as_a_full_forward_does(tmp_path, corpus):
    """Greedy sampling through a tokenizer: the prompt encoded, each next id the argmax of an ordinary forward over
    the whole prefix (computed here), the ids decoded by the tokenizer."""
    from helpers import tiny_model
    from tokenizers import Tokenizer

    from slimtune.generation import generate

    path = _tokenizer(tmp_path, corpus)
    tok = Tokenizer.from_file(str(path))
    model = tiny_model(dtype=torch.float64, vocab_size=300, hidden_dim=32, ffn_dim=64, n_heads=2, seed=3)
    ids = tok.encode("the market", add_special_tokens=False).ids
    for _ in range(12):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    prompt_len = len(tok.encode("the market", add_special_tokens=False).ids)
    sampled = generate(model, "the market", 12, temperature=0, tokenizer=path, chunk_size=4)
    assert sampled == tok.decode(ids[prompt_len:]).encode()
    with pytest.raises(Exception, match="give the `tokenizer`"):
        generate(model, "the market", 3, temperature=0, chunk_size=4)


def test_inspect_shows_the_vocabulary_and_the_tokenizer_a_run_recorded(tmp_path, corpus, capsys):
    from helpers import save_model, tiny_model

    path = _tokenizer(tmp_path, corpus)
    model = tmp_path / "m.safetensors"
    save_model(model, tiny_model(dtype=torch.float32, vocab_size=300, hidden_dim=32, ffn_dim=64, n_heads=2))
    (tmp_path / "train.txt").write_text(corpus[:6000])
    out = tmp_path / "tuned.safetensors"
    args = ["--data", tmp_path / "train.txt", "--tokenizer", path, "--seq-len", 64, "--run-dir", ""]
    assert _cli(["fit", "--checkpoint", model, "--out", out, *args], capsys)[0] == 0
    code, stdout, _ = _cli(["inspect", out, "--json"], capsys)
    info = json.loads(stdout.strip().splitlines()[-1])
    assert code == 0 and info["config"]["vocab_size"] == 300
    import hashlib

    assert info["tokenizer"].startswith("tokenizer.json (recorded in training; sha256 ")
    assert hashlib.sha256(path.read_bytes()).hexdigest() in info["tokenizer"]
    code, stdout, _ = _cli(["inspect", model, "--json"], capsys)
    assert json.loads(stdout.strip().splitlines()[-1])["tokenizer"] == "unknown: none recorded"


def test_pretrain_with_a_tokenizer_takes_its_vocabulary_and_fine_tunes_on_records(tmp_path, corpus, capsys):
    """The README's path: pretrain on text through a tokenizer (the model's vocabulary becomes the tokenizer's),
    then fit on .jsonl records, whose loss counts the completions only."""
    from slimtune.checkpoint import load_checkpoint

    path = _tokenizer(tmp_path, corpus, vocab_size=320)
    (tmp_path / "corpus.txt").write_text(corpus[:8000])
    base = tmp_path / "base.safetensors"
    code, _, err = _cli(["pretrain", "--recipe", "small", "--hidden-dim", 32, "--n-layers", 1, "--data",
                         tmp_path / "corpus.txt", "--tokenizer", path, "--seq-len", 64, "--steps", 2, "--out", base,
                         "--run-dir", ""], capsys)  # fmt: skip
    assert code == 0, err
    assert load_checkpoint(base).config.vocab_size == 320
    records = _jsonl(tmp_path / "r.jsonl", [{"prompt": f"q{i}: ", "completion": f"answer {i} "} for i in range(60)])
    code, stdout, err = _cli(["fit", "--checkpoint", base, "--data", records, "--tokenizer", path, "--seq-len", 32,
                              "--steps", 2, "--out", tmp_path / "tuned.safetensors", "--run-dir", "", "--json"],
                             capsys)  # fmt: skip
    assert code == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["steps"] == 2


def test_eval_of_records_scores_the_completions_only(tmp_path):
    """The mean next-token loss over the predictions whose target is a completion token, against an ordinary
    forward over the whole stream computed here."""
    import torch.nn.functional as F
    from helpers import tiny_model

    from slimtune.evaluation import evaluate

    records = [{"prompt": "Q: what is it? ", "completion": "an answer."}, {"prompt": "Say: ", "completion": "more"}]
    tokens = read_data(_jsonl(tmp_path / "r.jsonl", records))
    model = tiny_model(dtype=torch.float64, seed=2)
    ids = tokens.ids.long()
    with torch.no_grad():
        nll = F.cross_entropy(model(ids[None, :-1])[0], ids[1:], reduction="none")
    expected = nll[tokens.mask[1:]].mean().item()
    result = evaluate(model, tmp_path / "r.jsonl", seq_len=len(ids), chunk_size=7)
    assert abs(result.loss - expected) <= 1e-6 * expected  # eval takes the softmax in fp32
    assert result.predicted_bytes == int(tokens.mask[1:].sum())
