import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# Fixtures shared with the benchmarks (public model shapes, large synthetic checkpoints).
sys.path.insert(1, str(Path(__file__).parents[1] / "bench"))

from tiny_models import VARIANTS, save_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {name: save_tiny_model(name, root) for name in VARIANTS}
