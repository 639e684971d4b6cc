"""Calibration windows from files, directories and the built-in sets; every bad input is a CalibrationError."""

import json
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from moecompress.calibration.sources import (
    CalibrationSet,
    _draw_starts,
    builtin_data_dir,
    list_builtin_sets,
    load_calibration,
)
from moecompress.errors import CalibrationError, MoeCompressError

TEXT_SETS = ["prose", "code", "math", "multilingual", "chat"]


@pytest.fixture(scope="module")
def tokenizer():
    """Byte-level tokenizer built in memory (no network): one token per UTF-8 byte, EOS = 256."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["<eos>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


def _write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    return path


def _decode(tokenizer, row):
    return tokenizer.decode(row.tolist())


# ---------------------------------------------------------------------------------------------- good inputs


def test_txt_file_windows_are_slices_of_the_text(tmp_path, tokenizer):
    text = " ".join(f"word{i}" for i in range(400))
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    calib = load_calibration(str(path), tokenizer, nsamples=6, seqlen=64, seed=3)
    assert isinstance(calib, CalibrationSet) and len(calib) == 6
    assert calib.input_ids.shape == (6, 64) and calib.input_ids.dtype == torch.long
    assert calib.domains is None
    for row in calib.input_ids:
        assert _decode(tokenizer, row) in text + "<eos>"


def test_jsonl_keeps_the_domain_of_the_document_each_window_starts_in(tmp_path, tokenizer):
    path = _write_jsonl(
        tmp_path / "two.jsonl",
        [{"text": "a" * 300, "domain": "alpha"}, {"text": "b" * 300, "domain": "beta"}, {"text": "c" * 300}],
    )
    calib = load_calibration(str(path), tokenizer, nsamples=9, seqlen=40, seed=0)
    # The EOS after a document belongs to that document, so a window starting on it takes its domain.
    first_char_domain = {"a": "alpha", "b": "beta", "c": "unknown"}
    for row, domain in zip(calib.input_ids, calib.domains):
        first, second = _decode(tokenizer, row[:1]), _decode(tokenizer, row[1:2])
        if first == "<eos>":
            assert domain != first_char_domain[second]
        else:
            assert first_char_domain[first] == domain
    assert set(calib.domains) <= {"alpha", "beta", "unknown"}


def test_directory_is_read_recursively_and_ignores_other_files(tmp_path, tokenizer):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "z.txt").write_text("z" * 500, encoding="utf-8")
    _write_jsonl(tmp_path / "a.jsonl", [{"text": "y" * 500, "domain": "why"}])
    (tmp_path / "notes.csv").write_text("not,calibration\n", encoding="utf-8")
    calib = load_calibration(str(tmp_path), tokenizer, nsamples=20, seqlen=50, seed=1)
    seen = set("".join(_decode(tokenizer, row) for row in calib.input_ids).replace("<eos>", ""))
    assert seen == {"y", "z"}  # both files, nothing from the .csv
    assert set(calib.domains) == {"why", "unknown"}


@pytest.mark.parametrize("name", TEXT_SETS)
def test_every_builtin_set_exists_and_loads(name, tokenizer):
    assert (builtin_data_dir() / f"{name}.jsonl").is_file()
    calib = load_calibration(name, tokenizer, nsamples=8, seqlen=128, seed=0)
    assert calib.input_ids.shape == (8, 128)
    assert calib.domains == [name] * 8
    assert len(set(map(tuple, calib.input_ids.tolist()))) == 8  # 8 different windows


def test_builtin_files_are_small_and_well_formed():
    for name in TEXT_SETS:
        path = builtin_data_dir() / f"{name}.jsonl"
        assert path.stat().st_size < 1_000_000
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert 30 <= len(rows) <= 60
        assert all(isinstance(r["text"], str) and len(r["text"]) > 200 and r["domain"] == name for r in rows)


def test_mixed_deals_rows_round_robin_over_domains(tokenizer):
    calib = load_calibration("mixed", tokenizer, nsamples=12, seqlen=64, seed=0)
    assert calib.input_ids.shape == (12, 64)
    order = sorted(TEXT_SETS)
    assert calib.domains == [order[i % len(order)] for i in range(12)]


def test_list_builtin_sets_names_every_source_name():
    assert list_builtin_sets() == [*TEXT_SETS, "mixed", "self", "sample"]


def test_same_seed_same_windows_other_seed_other_windows(tokenizer):
    first = load_calibration("prose", tokenizer, nsamples=4, seqlen=64, seed=7)
    again = load_calibration("prose", tokenizer, nsamples=4, seqlen=64, seed=7)
    other = load_calibration("prose", tokenizer, nsamples=4, seqlen=64, seed=8)
    assert torch.equal(first.input_ids, again.input_ids) and first.domains == again.domains
    assert not torch.equal(first.input_ids, other.input_ids)


def test_windows_do_not_overlap_when_there_is_enough_text():
    gen = torch.Generator().manual_seed(0)
    starts = sorted(_draw_starts(1000, nsamples=7, seqlen=128, generator=gen, what="x"))
    assert all(b - a >= 128 for a, b in zip(starts, starts[1:]))
    assert starts[-1] + 128 <= 1000


def test_short_text_gives_overlapping_windows_inside_the_stream(tmp_path, tokenizer):
    path = tmp_path / "short.txt"
    path.write_text("abcdefghij" * 10, encoding="utf-8")  # 100 tokens + EOS
    calib = load_calibration(str(path), tokenizer, nsamples=8, seqlen=60, seed=0)
    assert calib.input_ids.shape == (8, 60)
    for row in calib.input_ids:
        assert _decode(tokenizer, row) in "abcdefghij" * 10 + "<eos>"


def test_self_needs_no_tokenizer_but_a_model():
    with pytest.raises(CalibrationError, match="model"):
        load_calibration("self", None, nsamples=2, seqlen=8)


# ----------------------------------------------------------------------------------------------- bad inputs


def test_missing_path(tokenizer):
    with pytest.raises(CalibrationError, match="not found"):
        load_calibration("/no/such/file.jsonl", tokenizer, nsamples=1, seqlen=8)


def test_empty_files(tmp_path, tokenizer):
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    for name in ("empty.txt", "empty.jsonl"):
        with pytest.raises(CalibrationError, match="empty"):
            load_calibration(str(tmp_path / name), tokenizer, nsamples=1, seqlen=8)


def test_directory_without_text_files(tmp_path, tokenizer):
    (tmp_path / "data.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(CalibrationError, match="no .txt or .jsonl"):
        load_calibration(str(tmp_path), tokenizer, nsamples=1, seqlen=8)


def test_unsupported_extension(tmp_path, tokenizer):
    path = tmp_path / "data.csv"
    path.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(CalibrationError, match="neither .txt nor .jsonl"):
        load_calibration(str(path), tokenizer, nsamples=1, seqlen=8)


def test_unknown_name_lists_the_names(tokenizer):
    with pytest.raises(CalibrationError) as info:
        load_calibration("wikitext", tokenizer, nsamples=1, seqlen=8)
    message = str(info.value)
    assert "wikitext" in message and all(name in message for name in list_builtin_sets())
    assert isinstance(info.value, MoeCompressError) and "\n" not in message


@pytest.mark.parametrize("nsamples", [0, -3])
def test_nsamples_below_one(nsamples, tokenizer):
    with pytest.raises(CalibrationError, match="nsamples"):
        load_calibration("prose", tokenizer, nsamples=nsamples, seqlen=8)


def test_seqlen_below_two(tokenizer):
    with pytest.raises(CalibrationError, match="seqlen"):
        load_calibration("prose", tokenizer, nsamples=1, seqlen=1)


def test_seqlen_beyond_the_models_positions(tokenizer):
    with pytest.raises(CalibrationError, match="positions"):
        load_calibration("prose", tokenizer, nsamples=1, seqlen=64, max_positions=32)
    fake_model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=32))
    with pytest.raises(CalibrationError, match="32 positions"):
        load_calibration("prose", tokenizer, nsamples=1, seqlen=64, model=fake_model)


def test_unreadable_jsonl_line_names_file_and_line(tmp_path, tokenizer):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(CalibrationError, match=r"broken\.jsonl, line 3"):
        load_calibration(str(path), tokenizer, nsamples=1, seqlen=8)


def test_jsonl_line_without_text(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "notext.jsonl", [{"text": "ok"}, {"body": "no text field"}])
    with pytest.raises(CalibrationError, match=r'line 2: needs a "text" field'):
        load_calibration(str(path), tokenizer, nsamples=1, seqlen=8)
    path = _write_jsonl(tmp_path / "number.jsonl", [{"text": 3}])
    with pytest.raises(CalibrationError, match="must be a string"):
        load_calibration(str(path), tokenizer, nsamples=1, seqlen=8)


def test_not_enough_tokens(tmp_path, tokenizer):
    path = tmp_path / "tiny.txt"
    path.write_text("too short", encoding="utf-8")
    with pytest.raises(CalibrationError, match="only 10 tokens"):
        load_calibration(str(path), tokenizer, nsamples=1, seqlen=64)


def test_text_source_without_tokenizer():
    with pytest.raises(CalibrationError, match="tokenizer"):
        load_calibration("prose", None, nsamples=1, seqlen=8)
