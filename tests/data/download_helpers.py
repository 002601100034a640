"""Shared by tests/test_download.py, tests/test_validate.py, the download subprocess script and
bench/download.py: a stand-in keyword_filter stage that commits a candidates table."""

from __future__ import annotations

import pyarrow as pa

from schemas.tables import CANDIDATES, KEYWORD_FILTER, sample_uid
from storage.stage import Stage, StageContext, StageResult


def candidates_table(source: str, partition: str, urls: list[str]) -> pa.Table:
    n = len(urls)
    return pa.table(
        {
            "uid": pa.array(
                [sample_uid(source, u, f"caption {i}") for i, u in enumerate(urls)], pa.uint64()
            ),
            "source": [source] * n,
            "partition": [partition] * n,
            "url": urls,
            "caption": [f"caption {i}" for i in range(n)],
            "width": pa.nulls(n, pa.int64()),
            "height": pa.nulls(n, pa.int64()),
            "keywords": pa.array([["aerial"]] * n, pa.list_(pa.string())),
        },
        schema=CANDIDATES,
    )


class CandidatesStub(Stage):
    """The keyword_filter stage's place: returns a fixed candidates table."""

    name = KEYWORD_FILTER
    version = "1"

    def __init__(self, source: str, partition: str, urls: list[str]):
        self.table = candidates_table(source, partition, urls)

    def params(self) -> dict:
        return {"urls": self.table.column("url").to_pylist()}

    def run(self, ctx: StageContext) -> StageResult:
        return StageResult(output=self.table)
