"""Every PUB11 source adapter on a small file in its real published format."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.sources import ADAPTERS, detect_format
from schemas.tables import sample_uid
from storage.root import DatasetRoot
from storage.stage import Partition, run_partition
from tasks.keyword_filter import KeywordFilterStage

RS = "Aerial view of a harbour with container ships"
NOT_RS = "A cat sleeping on a sofa"


def _tsv(path: Path, rows: list[list[str]], header: list[str] | None = None, gz: bool = False):
    opener = gzip.open if gz else open
    with opener(path, "wt", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar=None)
        if header:
            w.writerow(header)
        w.writerows(rows)


def _write(fmt: str, d: Path) -> tuple[Path, dict]:
    """A two-row file (one RS caption, one not) and the expected mapped fields of the RS row."""
    url = f"http://127.0.0.1:9/{fmt}/1.jpg"
    expect = {"url": url, "caption": RS, "width": None, "height": None, "extra": {}}
    if fmt in ("laion2b", "laion400m"):
        cols = {
            "URL": [url, "http://127.0.0.1:9/2.jpg"],
            "TEXT": [RS, NOT_RS],
            "WIDTH": [640, 300],
            "HEIGHT": [480, 200],
            "similarity": [0.31, 0.2],
        }
        cols.update(
            {"punsafe": [0.01, 0.2], "pwatermark": [0.1, 0.3]}
            if fmt == "laion2b"
            else {"SAMPLE_ID": [11, 12], "LICENSE": ["?", "?"], "NSFW": ["UNLIKELY", "UNLIKELY"]}
        )
        path = d / "part-00000.parquet"
        pq.write_table(pa.table(cols), path)
        expect.update(width=640, height=480, extra={"similarity": 0.31})
    elif fmt == "laion_coco":
        path = d / "part-00000.parquet"
        pq.write_table(
            pa.table(
                {
                    "URL": [url, "http://127.0.0.1:9/2.jpg"],
                    "TEXT": ["IMG_0001.jpg", "cat.jpg"],
                    "top_caption": [RS, NOT_RS],
                    "all_captions": [[RS, "a harbour"], [NOT_RS]],
                    "WIDTH": [800, 100],
                    "HEIGHT": [600, 100],
                    "similarity": [0.3, 0.3],
                }
            ),
            path,
        )
        expect.update(width=800, height=600, extra={"text": "IMG_0001.jpg"})
    elif fmt == "coyo700m":
        path = d / "coyo-part.parquet"
        pq.write_table(
            pa.table(
                {
                    "id": [4896263451343, 2],
                    "url": [url, "http://127.0.0.1:9/2.jpg"],
                    "text": [RS, NOT_RS],
                    "width": [600, 10],
                    "height": [447, 10],
                    "image_phash": ["bac58374982e0fc7", "00"],
                    "clip_similarity_vitb32": [0.319, 0.1],
                    "aesthetic_score_laion_v2": [7.0, 3.0],
                }
            ),
            path,
        )
        expect.update(width=600, height=447, extra={"clip_similarity_vitb32": 0.319})
    elif fmt == "wit":
        header = [
            "language",
            "page_url",
            "image_url",
            "page_title",
            "section_title",
            "hierarchical_section_title",
            "caption_reference_description",
            "caption_attribution_description",
            "caption_alt_text_description",
            "mime_type",
            "original_height",
            "original_width",
            "is_main_image",
            "attribution_passes_lang_id",
            "page_changed_recently",
            "context_page_description",
            "context_section_description",
        ]
        row = [
            "en",
            "https://en.wikipedia.org/wiki/Port",
            url,
            "Port",
            "",
            "",
            "",
            "English: " + RS,
            RS,
            "image/jpeg",
            "480",
            "640",
            "true",
            "true",
            "",
            "",
            "",
        ]
        other = [
            "fr",
            "p",
            "http://127.0.0.1:9/2.jpg",
            "",
            "",
            "",
            RS,
            "",
            "",
            "image/jpeg",
            "1",
            "1",
            "false",
            "true",
            "",
            "",
            "",
        ]
        path = d / "wit_v1.train.all-00000-of-00010.tsv.gz"
        _tsv(path, [row, other], header, gz=True)
        expect.update(width=640, height=480, extra={"language": "en"})
    elif fmt == "yfcc15m":
        header = [
            "photoid",
            "uid",
            "unickname",
            "datetaken",
            "dateuploaded",
            "capturedevice",
            "title",
            "description",
            "usertags",
            "machinetags",
            "longitude",
            "latitude",
            "accuracy",
            "pageurl",
            "downloadurl",
            "licensename",
            "licenseurl",
            "serverid",
            "farmid",
            "secret",
            "secretoriginal",
            "ext",
            "marker",
        ]
        row = [
            "6985418911",
            "u",
            "n",
            "2012-03-01",
            "1330000000",
            "",
            "Aerial+view",
            "of+a+harbour+with+container+ships",
            "",
            "",
            "2.35",
            "48.85",
            "16",
            "p",
            url,
            "Attribution",
            "l",
            "1",
            "8",
            "s",
            "o",
            "jpg",
            "0",
        ]
        other = [
            "2",
            "u",
            "n",
            "",
            "",
            "",
            "my+cat",
            "",
            "",
            "",
            "",
            "",
            "",
            "p",
            "http://127.0.0.1:9/2.jpg",
            "",
            "",
            "",
            "",
            "",
            "",
            "jpg",
            "0",
        ]
        path = d / "yfcc15m-0000.tsv"
        _tsv(path, [row, other], header)
        expect.update(
            caption="Aerial view. of a harbour with container ships",
            extra={"lat": 48.85, "lon": 2.35},
        )
    elif fmt in ("cc12m", "cc3m"):
        path = d / f"{fmt}.tsv"
        rows = [[url, RS], ["http://127.0.0.1:9/2.jpg", NOT_RS]]
        _tsv(path, rows if fmt == "cc12m" else [r[::-1] for r in rows])
    elif fmt == "redcaps":
        path = d / "redcaps-earthporn.parquet"
        pq.write_table(
            pa.table(
                {
                    "image_id": ["abc", "def"],
                    "author": ["a", "b"],
                    "url": [url, "http://127.0.0.1:9/2"],
                    "raw_caption": ["[OC] " + RS, NOT_RS],
                    "caption": [RS, NOT_RS],
                    "subreddit": ["earthporn", "cats"],
                    "score": [10, 3],
                    "created_utc": [1.0, 2.0],
                    "permalink": ["/r/x", "/r/y"],
                }
            ),
            path,
        )
        expect.update(extra={"subreddit": "earthporn"})
    elif fmt == "sbu":
        path = d / "sbu-00000.parquet"
        pq.write_table(
            pa.table(
                {
                    "image_url": [url, "http://127.0.0.1:9/2"],
                    "user_id": ["u1", "u2"],
                    "caption": [RS, NOT_RS],
                }
            ),
            path,
        )
        expect.update(extra={"user_id": "u1"})
    elif fmt == "vg":
        path = d / "vg-regions.csv"
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["region_id", "image_id", "url", "width", "height", "phrase", "x", "y"])
            w.writerow([1, 10, url, 800, 600, RS, 0, 0])
            w.writerow([2, 11, "http://127.0.0.1:9/2", 10, 10, NOT_RS, 0, 0])
        expect.update(width=800, height=600, extra={"image_id": "10"})
    else:
        raise AssertionError(fmt)
    return path, expect


@pytest.mark.parametrize("fmt", sorted(ADAPTERS))
def test_adapter_maps_real_columns(tmp_path, fmt):
    path, expect = _write(fmt, tmp_path)
    root = DatasetRoot(tmp_path / "root")
    outcome = run_partition(root, KeywordFilterStage(fmt), Partition(fmt, "p0", str(path)))
    assert outcome.status == "done", outcome.error
    rows = root.read_table(root.output_path("keyword_filter", fmt, "p0")).to_pylist()
    assert len(rows) == 1
    row = rows[0]
    assert row["url"] == expect["url"]
    assert row["caption"] == expect["caption"]
    assert row["width"] == expect["width"] and row["height"] == expect["height"]
    assert row["uid"] == sample_uid(fmt, expect["url"], expect["caption"])
    assert row["source"] == fmt and row["partition"] == "p0"
    assert row["keywords"], row["keywords"]
    for column, value in expect["extra"].items():
        assert (
            row[column] == pytest.approx(value)
            if isinstance(value, float)
            else row[column] == value
        )
    marker = root.read_json(root.marker_path("keyword_filter", fmt, "p0"))
    assert marker["counts"]["rows_in"] == 2


def test_real_cc3m_and_coyo_files(fixtures_dir, tmp_path):
    root = DatasetRoot(tmp_path / "root")
    meta = fixtures_dir / "metadata"
    cc3m = run_partition(
        root,
        KeywordFilterStage("cc3m"),
        Partition("cc3m", "val", str(meta / "Validation_GCC-1.1.0-Validation.tsv")),
    )
    assert cc3m.status == "done", cc3m.error
    tsv = meta / "Validation_GCC-1.1.0-Validation.tsv"
    lines = len(tsv.read_text(encoding="utf-8").splitlines())
    marker = root.read_json(root.marker_path("keyword_filter", "cc3m", "val"))
    assert marker["counts"]["rows_in"] == lines
    assert 0 < marker["counts"]["rows_out"] < lines / 20
    coyo = run_partition(
        root,
        KeywordFilterStage("coyo700m"),
        Partition("coyo", "readme", str(meta / "coyo_readme_examples.csv")),
    )
    assert coyo.status == "done", coyo.error
    assert (
        root.read_json(root.marker_path("keyword_filter", "coyo", "readme"))["counts"]["rows_in"]
        == 7
    )


def test_detect_format():
    assert detect_format("a/b.parquet") == "parquet"
    assert detect_format("x.tsv.gz") == "tsv"
    assert detect_format("x.CSV") == "csv"
    with pytest.raises(ValueError, match="unknown metadata file type"):
        detect_format("x.json")
