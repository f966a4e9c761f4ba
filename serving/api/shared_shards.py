"""Expert shards shared by several engine deployments: the ExpertShards deployment holds their
owner (experts/shared_pool.py ShardOwner), and each engine reaches it through an OwnerHandle.

Serve manages the owner's life: deleted with the app, restarted when its replica dies (its shards
are its own actors and go with it; the engines keep serving on their last view until its
successor's first).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os

from ray import serve
from ray.serve.handle import DeploymentHandle

from serving.config import ServeConfig

# A view the owner has not given within this is skipped: the engine keeps its last one (the
# owner's replica may be restarting) and asks again at its next poll.
POLL_TIMEOUT_S = 5.0


@serve.deployment(name="ExpertShards")
class ExpertShards:
    """The expert shards that several engines share (experts/shared_pool.py ShardOwner): it starts,
    replaces and changes them; the engines call them directly. Its methods block on Ray, so they
    run off the replica's event loop."""

    def __init__(self, config: ServeConfig) -> None:
        from serving.api.serving_model import model_dir, pool_options, torch_dtype
        from serving.engine.load import start_shard_owner

        options = pool_options(config)
        self.owner = start_shard_owner(model_dir(config), dtype=torch_dtype(config),
                                       device=config.device, **options)  # fmt: skip

    async def view(self, engine: str, window):
        return await asyncio.to_thread(self.owner.view, engine, window)

    async def shard_failed(self, shard: int, actor) -> None:
        await asyncio.to_thread(self.owner.shard_failed, shard, actor)

    async def reconfigure(self, action: str, wait: bool) -> None:
        await asyncio.to_thread(self.owner.reconfigure, action, wait)

    async def pid(self) -> int:
        """This replica's process (its shards die with it): for the fault tests."""
        return os.getpid()


class OwnerHandle:
    """experts/shared_pool.py OwnerLink over the ExpertShards deployment. Its calls block, so the
    engine makes them from threads (its poller, its forward thread), never on its event loop."""

    def __init__(self, handle: DeploymentHandle, timeout_s: float) -> None:
        self.handle, self.timeout_s = handle, timeout_s
        self._answered = False  # the owner is up: a view may take at most POLL_TIMEOUT_S

    def view(self, engine: str, window):
        call = self.handle.view.remote
        timeout = POLL_TIMEOUT_S if self._answered else self.timeout_s  # the first loads shards
        view = off_loop(lambda: call(engine, window).result(timeout_s=timeout))
        self._answered = True
        return view

    def shard_failed(self, shard: int, actor) -> None:
        self._call("shard_failed", shard, actor)

    def reconfigure(self, action: str, wait: bool) -> None:
        self._call("reconfigure", action, wait)

    def _call(self, method: str, *args):
        call = getattr(self.handle, method).remote
        return off_loop(lambda: call(*args).result(timeout_s=self.timeout_s))


def off_loop(fn):
    """fn() on a thread of its own when this thread runs an event loop (a Serve replica's
    constructor may), where Serve refuses a blocking result; else here."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()
