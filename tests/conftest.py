import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("CANONWRAP_TEST_THREADS", "1")))


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
