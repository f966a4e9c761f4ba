"""moe-serve: serving top-2 Mixture-of-Experts models on Ray, honestly measured.

`from serving import load_model` is the Python entry point (see serving/engine/load.py). It is imported
lazily so that `import serving.cli` stays light (no torch for `moe-serve plan --help`).
"""

from typing import Any

__all__ = ["load_model"]


def __getattr__(name: str) -> Any:
    if name == "load_model":
        from serving.engine.load import load_model

        return load_model
    raise AttributeError(f"module 'serving' has no attribute {name!r}")
