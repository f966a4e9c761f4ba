"""Several engine deployments behind one ingress (config.engine_replicas): their names, where they
go, their threads, and the ingress's view of them (one event stream each, stats totals, calls
bounded in time: a Serve handle holds a call to a lost replica until Serve starts another).
"""

from __future__ import annotations

import asyncio
import os

from ray.serve.handle import DeploymentHandle

from serving.api.streams import IngressStreams
from serving.config import ServeConfig


def engine_names(config: ServeConfig) -> list[str]:
    """The Engine deployments: "Engine", then "Engine-1", ... (the controller's is the first);
    as many as the controller may run (config.engines_at_most)."""
    return ["Engine"] + [f"Engine-{i}" for i in range(1, config.engines_at_most)]


def engine_share(config: ServeConfig) -> float:
    """How much of the engine_resource marker an engine asks for. Several engines take almost a
    whole unit each, so a node advertising N units holds at most N of them: marked with 1 each,
    engines land on different nodes (losing one node loses one engine), and the ingress's sliver
    still fits beside one. One engine takes a sliver, like the ingress."""
    return ENGINE_SHARE if config.engines_at_most > 1 else 0.001


ENGINE_SHARE = 0.99


def engine_ask(config: ServeConfig) -> dict[str, float]:
    """The Ray resources one engine replica asks for beyond its 0 CPUs: a GPU on CUDA, and its
    share of the engine_resource marker."""
    ask = {"GPU": 1.0} if config.device.startswith("cuda") else {}
    if config.engine_resource:
        ask[config.engine_resource] = engine_share(config)
    return ask


def engine_threads(config: ServeConfig) -> int:
    """The torch threads of each engine: `torch_threads`, else `default_threads`."""
    return config.torch_threads or default_threads(config)


def default_threads(config: ServeConfig) -> int:
    """Every core but one (the HTTP proxy's and the ingress's), shared by the most engines that
    may run at once."""
    return max(1, ((os.cpu_count() or 1) - 1) // config.engines_at_most)


def ingress_streams(engine: DeploymentHandle) -> IngressStreams:
    return IngressStreams(
        submit=lambda job, stream, request: engine.submit.remote(job, stream, request),
        open_stream=lambda stream: engine.options(stream=True).stream.remote(stream),
        cancel=lambda request: engine.cancel.remote(request),
    )


def total_stats(each: list[dict | None]) -> dict:
    """Engines' stats summed over those that answered (counts, slots, tokens; a flag such as
    `draining` only where all have it: while one engine drains, being removed, the others take
    requests), each under `engines` (None: no answer). Raises when none answered."""
    answered = _answered(each)
    total: dict = {}
    for key, value in answered[0].items():
        values = [e[key] for e in answered]
        total[key] = all(values) if isinstance(value, bool) else sum(values)
    return total | {"engines": each}


def merged_status(each: list[dict | None]) -> dict:
    """One status from the engines' (None: no answer): the first answer's, with the overflow
    counts summed over every answer (each engine's balancer counts its own tokens). Raises when
    none answered."""
    answered = _answered(each)
    overflows = [e["overflow"] for e in answered if e.get("overflow")]
    if not overflows:
        return answered[0]
    layers = [  # one layer's counts from every engine -> their sums
        {kind: sum(counts[kind] for counts in same) for kind in same[0]}
        for same in zip(*(o["layers"] for o in overflows), strict=True)
    ]
    return answered[0] | {"overflow": overflows[0] | {"layers": layers}}


def _answered(each: list[dict | None]) -> list[dict]:
    """The engines' answers that came (None: no answer); raises when none did."""
    answered = [e for e in each if e is not None]
    if not answered:
        raise RuntimeError("no engine answered")
    return answered


ANSWER_S = 3.0  # an engine that has not answered a stats or status call by then is skipped


async def within(response) -> dict | None:
    """The call's answer, or None when it raised or took over ANSWER_S."""
    try:
        return await asyncio.wait_for(_awaited(response), ANSWER_S)
    except Exception:  # lost, restarting or overloaded: the others answer
        return None


async def _awaited(response):
    return await response
