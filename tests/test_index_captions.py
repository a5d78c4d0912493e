"""Caption sources for the index: text, CSV and JSONL readers, empty/duplicate dropping, metadata."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transresnet.index.captions import read_captions

from tests.helpers import shared_path


def test_text_file_drops_empty_and_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_text("A dog runs.\n\n   \nA cat sleeps.\na  DOG runs.\nA dog runs.\nA bird sings.\n", encoding="utf-8")
    table = read_captions(path)
    assert table.captions == ["A dog runs.", "A cat sleeps.", "A bird sings."]
    assert table.ids == ["0", "3", "6"]  # line numbers of the kept captions
    assert (table.rows_read, table.dropped_empty, table.dropped_duplicate) == (7, 2, 2)
    assert table.metadata == {}


def test_csv_keeps_metadata_and_first_duplicate(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text("image,caption,personality\n"
                    "a.jpg,A red thing.,Sweet\n"
                    "b.jpg,  a red   thing. ,Angry\n"
                    "c.jpg,,Sweet\n"
                    "d.jpg,\"A blue thing, with a comma.\",\n", encoding="utf-8")
    table = read_captions(path)
    assert table.captions == ["A red thing.", "A blue thing, with a comma."]
    assert table.metadata == {"image": ["a.jpg", "d.jpg"], "personality": ["Sweet", ""]}
    assert table.report() == {"path": str(path), "format": "csv", "rows": 4, "kept": 2, "dropped_empty": 1,
                              "dropped_duplicate": 1}


def test_jsonl_ids_and_late_columns(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    rows = [{"caption": "one", "id": 7}, {"caption": "two", "id": "x", "personality": "Sweet", "extra": {"a": 1}},
            {"caption": " "}, {"caption": "three"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    table = read_captions(path)
    assert table.ids == ["7", "x", "3"]
    assert table.metadata["personality"] == [None, "Sweet", None]
    assert table.metadata["extra"] == [None, '{"a": 1}', None]
    assert table.dropped_empty == 1


@pytest.mark.parametrize(("name", "content", "message"), [
    ("c.csv", "image,text\na.jpg,hello\n", "no 'caption' column"),
    ("c.jsonl", '{"text": "hello"}\n', "no 'caption' field"),
    ("c.jsonl", "{not json\n", "not valid JSON"),
    ("c.xlsx", "x", "cannot tell the format"),
    ("c.parquet", "x", "not a readable Parquet file"),
    ("c.txt", "\n  \n", "no non-empty captions"),
])
def test_bad_sources_say_what_to_fix(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        read_captions(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        read_captions(tmp_path / "nope.csv")


def test_several_files_and_a_folder_read_as_one_source(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = tmp_path / "shards"
    (shards / "part-1").mkdir(parents=True)
    (shards / "a.csv").write_text("caption,personality\nA dog runs.,Sweet\n,Angry\n", encoding="utf-8")
    (shards / "part-1" / "b.jsonl").write_text('{"caption": "a DOG runs."}\n{"caption": "A cat."}\n',
                                               encoding="utf-8")
    pq.write_table(pa.table({"caption": ["A cat.", "A bird."], "id": ["p0", None]}), shards / "part-1" / "c.parquet")
    (shards / "_SUCCESS").write_text("", encoding="utf-8")  # writer markers and hidden files are skipped
    (shards / ".c.parquet.crc").write_text("x", encoding="utf-8")
    table = read_captions(shards)
    assert table.captions == ["A dog runs.", "A cat.", "A bird."]
    assert table.ids == ["0", "3", "5"]  # row numbers run across the files, in path order
    assert table.metadata["personality"] == ["Sweet", None, None]
    assert (table.rows_read, table.dropped_empty, table.dropped_duplicate) == (6, 1, 2)
    assert table.format == "csv+jsonl+parquet"
    # The same files named one by one give the same table.
    files = [shards / "a.csv", shards / "part-1" / "b.jsonl", shards / "part-1" / "c.parquet"]
    assert read_captions(files).captions == table.captions


def test_empty_folder_and_parquet_without_captions_say_what_to_fix(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no caption files"):
        read_captions(tmp_path / "empty")
    pq.write_table(pa.table({"text": ["hello"]}), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match="no 'caption' column"):
        read_captions(tmp_path / "t.parquet")


@pytest.mark.shared
def test_real_flickr8k_captions() -> None:
    table = read_captions(shared_path("data", "flickr8k-captions", "captions.csv"))
    assert table.rows_read == 39460
    assert len(table) + table.dropped_duplicate + table.dropped_empty == 39460
    assert 0 < table.dropped_duplicate < 1000
    assert set(table.metadata) == {"image"}
