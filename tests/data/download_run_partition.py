"""Run the candidates stub and the download stage on one partition, in its own process (the
SIGKILL test kills it). Usage: python download_run_partition.py ROOT JOB.json

JOB.json: {"source": ..., "partition": ..., "urls": [...], "download": {DownloadConfig fields}}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for download_helpers
sys.path.insert(1, str(Path(__file__).resolve().parents[2]))  # the project

from download_helpers import CandidatesStub

from schemas.download_config import DownloadConfig
from storage.root import DatasetRoot
from storage.stage import Partition, run_partition
from tasks.download import DownloadStage

if __name__ == "__main__":
    root = DatasetRoot(sys.argv[1])
    job = json.loads(Path(sys.argv[2]).read_text())
    part = Partition(job["source"], job["partition"])
    print(run_partition(root, CandidatesStub(job["source"], job["partition"], job["urls"]), part))
    print(run_partition(root, DownloadStage(DownloadConfig(**job["download"])), part), flush=True)
