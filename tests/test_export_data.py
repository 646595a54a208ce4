"""Export data: built-in corpora, user files and folders, the split, batching, compressor
baselines, digits and JSONL classifier data, and their error messages."""

from __future__ import annotations

import json
import zlib

import pytest

from seqserve.export.baselines import compressor_baselines, conditional_bits_per_byte
from seqserve.export.classify_data import load_digits_data, load_jsonl_data, split_per_label
from seqserve.export.data import (
    MIN_CORPUS_BYTES,
    STDLIB_CAP_BYTES,
    DataError,
    batchify,
    chunks,
    load_corpus,
    split_corpus,
    to_tensor,
)

pytestmark = pytest.mark.timeout(60)


def test_docs_corpus_is_pydoc_topics_in_sorted_key_order():
    from pydoc_data.topics import topics

    corpus = load_corpus("docs")
    first = sorted(topics)[0]
    assert corpus.data.startswith(topics[first].encode("utf-8"))
    assert corpus.data.endswith(topics[sorted(topics)[-1]].encode("utf-8"))
    assert 300_000 < len(corpus.data) < 2_000_000
    assert corpus.describe()["bytes"] == len(corpus.data)


def test_stdlib_corpus_is_capped_deterministic_python_source():
    first, second = load_corpus("stdlib"), load_corpus("stdlib")
    assert first.data == second.data
    assert 1_000_000 < len(first.data) <= STDLIB_CAP_BYTES
    assert first.files > 10
    assert b"def " in first.data and b"import " in first.data
    first.data.decode("utf-8")


def test_file_and_folder_corpora(tmp_path):
    text = "hello recurrent world\n" * 100
    single = tmp_path / "one.txt"
    single.write_text(text, encoding="utf-8")
    assert load_corpus(str(single)).data == text.encode()

    folder = tmp_path / "books"
    folder.mkdir()
    (folder / "b.txt").write_text("B" * 800, encoding="utf-8")
    (folder / "a.txt").write_text("A" * 800, encoding="utf-8")
    (folder / "image.bin").write_bytes(bytes(range(256)) * 4)  # not UTF-8: skipped
    (folder / ".hidden.txt").write_text("H" * 800, encoding="utf-8")
    corpus = load_corpus(str(folder))
    assert corpus.data == b"A" * 800 + b"B" * 800
    assert corpus.files == 2


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "neither docs nor stdlib nor an existing file or folder"),
        ("empty", "is empty"),
        ("small", f"at least {MIN_CORPUS_BYTES} are needed"),
        ("latin1", "is not UTF-8 text"),
        ("binary-folder", "holds no UTF-8 text files"),
    ],
)
def test_corpus_errors(tmp_path, case, message):
    path = tmp_path / "corpus.txt"
    if case == "empty":
        path.write_bytes(b"  \n")
    elif case == "small":
        path.write_text("tiny", encoding="utf-8")
    elif case == "latin1":
        path.write_bytes("caf\u00e9 ".encode("latin-1") * 400)
    elif case == "binary-folder":
        path = tmp_path / "bin"
        path.mkdir()
        (path / "x.dat").write_bytes(b"\xff\xfe" * 600)
    with pytest.raises(DataError, match=message):
        load_corpus(str(path))


def test_split_holds_out_the_last_tenth():
    data = bytes(range(256)) * 40
    train, val = split_corpus(data)
    assert train + val == data
    assert len(val) == round(len(data) * 0.1)


def test_batchify_and_chunks_keep_each_stream_in_order():
    tokens = to_tensor(bytes(range(100)))
    rows = batchify(tokens, 4)  # 4 streams of 25
    assert rows.shape == (4, 25)
    assert rows[1, 0].item() == 25
    pieces = list(chunks(rows, 10))
    assert [x.shape[1] for x, _ in pieces] == [10, 10, 4]
    for x, y in pieces:
        assert (y == x + 1).all()  # targets are the next byte of the same stream
    with pytest.raises(DataError, match="smaller batch size"):
        batchify(to_tensor(b"abc"), 8)


def test_compressor_baselines_on_docs():
    train, val = split_corpus(load_corpus("docs").data)
    figures = compressor_baselines(train, val)
    assert 1.5 < figures["zlib_bits_per_byte"] < 2.5
    assert 1.0 < figures["xz_bits_per_byte"] < figures["zlib_bits_per_byte"]
    # The formula: extra compressed bits for val once train is known.
    expected = (len(zlib.compress(train + val, 9)) - len(zlib.compress(train, 9))) * 8 / len(val)
    assert conditional_bits_per_byte(lambda b: zlib.compress(b, 9), train, val) == pytest.approx(expected)


def test_digits_as_eight_steps_of_eight_features():
    data = load_digits_data(seed=0, val_fraction=0.2)
    assert data.input_kind == "features" and data.input_dim == 8
    assert data.labels == [str(i) for i in range(10)]
    assert data.train.inputs.shape[1:] == (8, 8)
    assert len(data.train) + len(data.val) == 1797
    assert 0.15 < len(data.val) / 1797 < 0.25
    assert float(data.train.inputs.max()) <= 1.0
    assert set(data.val.targets.tolist()) == set(range(10))
    again = load_digits_data(seed=0, val_fraction=0.2)
    assert (again.val.targets == data.val.targets).all()
    other = load_digits_data(seed=1, val_fraction=0.2)
    assert not (other.val.inputs.shape == data.val.inputs.shape and (other.val.inputs == data.val.inputs).all())


def test_split_per_label_keeps_every_label_in_training():
    targets = [0] * 10 + [1] * 3 + [2]
    train, val = split_per_label(targets, 0.3, seed=5)
    assert sorted(train + val) == list(range(len(targets)))
    assert {targets[i] for i in train} == {0, 1, 2}
    assert sum(targets[i] == 0 for i in val) == 3


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_labels_sorted_and_bytes_encoded(tmp_path):
    rows = [{"text": f"ham {i} \u00e9", "label": "ham"} for i in range(10)]
    rows += [{"text": f"spam {i}", "label": "spam"} for i in range(10)]
    rows += [{"text": "eggs", "label": 3}] * 5
    data = load_jsonl_data(_jsonl(tmp_path / "d.jsonl", rows), seed=0, val_fraction=0.2, max_len=6)
    assert data.labels == ["3", "ham", "spam"]
    assert data.input_kind == "tokens" and data.input_dim == 256
    assert data.train.inputs.shape[1] == 6  # cut to max_len
    assert int(data.train.lengths.max()) == 6 and int(data.train.lengths.min()) == 4
    assert len(data.val) == 2 + 2 + 1


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "holds no examples"),
        (b'{"text": "a", "label": "x"}\n\xff\xfe\n', "line 2 is not UTF-8"),
        (b'{"text": "a", "label": "x"}\nnot json\n', "line 2 is not valid JSON"),
        (b'{"text": "a"}\n', 'must be an object with "text" and "label"'),
        (b'{"text": "", "label": "x"}\n', "non-empty string"),
        (b'{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n', "at least 2"),
    ],
)
def test_jsonl_errors(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_jsonl_data(path, seed=0, val_fraction=0.2, max_len=64)


def test_jsonl_unknown_validation_label(tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    val = _jsonl(tmp_path / "val.jsonl", [{"text": "c", "label": "x"}, {"text": "d", "label": "z"}])
    with pytest.raises(DataError, match="unknown label 'z'"):
        load_jsonl_data(train, seed=0, val_fraction=0.2, max_len=64, val_path=val)
    with pytest.raises(DataError, match="does not exist"):
        load_jsonl_data(tmp_path / "nope.jsonl", seed=0, val_fraction=0.2, max_len=64)
