import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.chdir(ROOT)  # stages read their default YAML from configs/
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """A fresh cache for tiny twins, so the suite exercises building them from scratch."""
    path = tmp_path_factory.mktemp("alignment-cache")
    old = os.environ.get("ALIGNMENT_CACHE")
    os.environ["ALIGNMENT_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("ALIGNMENT_CACHE", None)
    else:
        os.environ["ALIGNMENT_CACHE"] = old
