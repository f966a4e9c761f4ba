"""tests/gpu: CUDA only. Every test in this folder is marked `gpu` and, without a CUDA device,
skipped with the reason "needs a CUDA device": always collected, so a CPU run of `pytest tests`
lists them as skipped. `bash scripts/gpu_check.sh` runs them (and the GPU benchmarks) on a GPU box.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
NO_CUDA = "needs a CUDA device"


@pytest.hookimpl(tryfirst=True)  # before `-m` selection reads the markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # This hook sees the whole session's items: touch only those under tests/gpu.
    cuda = torch.cuda.is_available()
    for item in items:
        if HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.gpu)
            if not cuda:
                item.add_marker(pytest.mark.skip(reason=NO_CUDA))


@pytest.fixture
def no_tf32():
    """Full fp32 matmuls for the test (TF32 keeps 10 mantissa bits: ~1e-3, not 1e-4)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="session")
def ray_gpu(request: pytest.FixtureRequest):
    """The session's one Ray (tests/conftest.py's `ray_session`), which must see a GPU."""
    pytest.importorskip("ray", reason="ray is not installed in this Python")
    ray_session = request.getfixturevalue("ray_session")
    gpus = ray_session.cluster_resources().get("GPU", 0)
    if gpus < 1:
        pytest.skip(
            f"Ray sees {gpus} GPU(s): the session's Ray was started without the GPU "
            "(ray.init with num_gpus=0, or CUDA_VISIBLE_DEVICES empty)"
        )
    return ray_session
