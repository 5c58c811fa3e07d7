import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # for `import oracles`

torch.set_num_threads(max(1, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="module")
def fresh_dynamo():
    """Each test module starts with dynamo's caches empty: eager FlexAttention compiles through
    dynamo, and after hundreds of shapes from earlier modules this torch crashed while working
    out why a cached graph did not fit (a TypeError in its guard-failure report), a failure of
    the test order, not of the code under test."""
    torch._dynamo.reset()
    yield
