import os
import sys

import pytest

AT1_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPER_DIR = os.path.normpath(os.path.join(AT1_DIR, "..", "..", "worker", "python"))
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
for path in (AT1_DIR, HELPER_DIR, TESTS_DIR):
    if path not in sys.path:
        sys.path.insert(0, path)


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> str:
    """Small synthetic dataset: 8 train shards of 48 samples (16x16 latents), 1 val shard."""
    from make_synthetic_shards import main as make_shards

    out = tmp_path_factory.mktemp("at1-data")
    make_shards(["--out", str(out), "--train-samples", "384", "--val-samples", "48", "--samples-per-shard", "48", "--latent-size", "16"])
    return str(out)
