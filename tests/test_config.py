"""The typed configuration: TOML file, environment overrides, validation errors."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from flows.partitions import discover, partition_name
from schemas.config import load_config


def _write(tmp_path, text: str):
    path = tmp_path / "build.toml"
    path.write_text(text)
    return path


def test_toml_then_environment_overrides(tmp_path, monkeypatch):
    (tmp_path / "meta").mkdir()
    for name in ("b.parquet", "a.parquet", "c.tsv.gz"):
        (tmp_path / "meta" / name).write_bytes(b"")
    path = _write(
        tmp_path,
        '[[sources]]\nname = "laion2b"\nformat = "laion2b"\npaths = ["meta/*.parquet"]\n'
        '[[sources]]\nname = "cc12m"\nformat = "cc12m"\n'
        'paths = ["meta/c.tsv.gz", "meta/gone.tsv"]\n'
        "[keyword_filter]\nmax_caption_chars = 1000\n[download]\nthread_count = 7\n"
        "[validate]\nmin_side = 20\n",
    )
    cfg = load_config(path)
    assert cfg.keyword_filter.max_caption_chars == 1000
    assert cfg.download.thread_count == 7
    assert cfg.validate_.min_side == 20
    assert cfg.base_dir == tmp_path

    monkeypatch.setenv("RS5M_KEYWORD_FILTER__MAX_CAPTION_CHARS", "2048")
    monkeypatch.setenv("RS5M_RUN__WORKERS", "5")
    cfg = load_config(path)
    assert cfg.keyword_filter.max_caption_chars == 2048
    assert cfg.run.workers == 5
    assert cfg.download.thread_count == 7  # untouched by the environment

    parts = discover(cfg)
    assert [(p.source, p.name) for p in parts] == [
        ("cc12m", "c"),
        ("cc12m", "gone"),  # a listed file that is missing stays, to be reported
        ("laion2b", "a"),
        ("laion2b", "b"),
    ]
    assert parts[0].raw_input == str(tmp_path / "meta" / "c.tsv.gz")


def test_bad_config_is_rejected_with_the_field(tmp_path):
    with pytest.raises(ValidationError, match="unknown format 'laion5b'"):
        load_config(_write(tmp_path, '[[sources]]\nname = "x"\nformat = "laion5b"\npaths = []\n'))
    with pytest.raises(ValidationError, match="Bad Name"):
        load_config(
            _write(tmp_path, '[[sources]]\nname = "Bad Name"\nformat = "cc3m"\npaths = []\n')
        )
    with pytest.raises(ValidationError, match="typo_section"):
        load_config(_write(tmp_path, "[typo_section]\nx = 1\n"))
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "missing.toml")


def test_partition_names_are_safe():
    assert partition_name("/d/laion2B-en/part-00001-5114fd87.snappy.parquet") == (
        "part-00001-5114fd87.snappy"
    )
    assert partition_name("s3://b/wit_v1.train.all-00000-of-00010.tsv.gz") == (
        "wit_v1.train.all-00000-of-00010"
    )
    assert partition_name("/x/a b#c.csv") == "a_b_c"
