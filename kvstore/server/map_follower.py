"""Keeping a node's cluster map up to date from the metadata group (kvstore/meta/store.py).

Every node of a cluster with a metadata group polls it (`POLL_SECONDS`) and adopts a map with a
larger epoch: a change reaches every node within about a second. A request carrying a newer
epoch than the node's (its client learned first) wakes the poll at once. Data nodes keep the
newest map they adopted in their data directory (`CACHE_FILE`), so a node restarted while the
group has no quorum does not fall back to an older map than it already served under.

If the group is unreachable the node keeps serving under the map it holds and says so in its
log, once per outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from kvstore import errors
from kvstore.meta.store import MapStore
from kvstore.routing.cluster_map import ClusterMap

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
CACHE_FILE = "cluster-map.json"


def newest_map(file_map: ClusterMap, data_dir: str | Path) -> ClusterMap:
    """The newer of the map file a node was started with and the one it last adopted (if any)."""
    path = Path(data_dir) / CACHE_FILE
    if not path.exists():
        return file_map
    try:
        cached = ClusterMap.load(path)
    except (OSError, ValueError, KeyError, TypeError, errors.KvError) as exc:
        log.warning("ignoring the cached cluster map %s: %s", path, exc)
        return file_map
    if cached.cluster_id != file_map.cluster_id or cached.epoch <= file_map.epoch:
        return file_map
    log.info("starting from the cached cluster map (epoch %d; %s has %d)", cached.epoch, path, file_map.epoch)
    return cached


class MapFollower:
    """Polls the metadata group; calls `adopt(map)` with each newer map it finds.

    `seed`: also store the starting map if the group holds none (the group's own replicas do:
    whichever gets there first wins, the others find it stored)."""

    def __init__(
        self,
        start: ClusterMap,
        adopt: Callable[[ClusterMap], bool],
        seed: bool,
        cache_dir: str | Path | None,
        admin_token: str = "",
    ) -> None:
        self.epoch = start.epoch
        self._start = start
        self._adopt = adopt
        self._seed = seed
        self._cache = Path(cache_dir) / CACHE_FILE if cache_dir is not None else None
        self._store = MapStore(start, timeout=2.0, admin_token=admin_token)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._trouble = ""  # what went wrong at the last poll ("" if it worked)
        self._revision = 0  # the stored map's revision at the last poll (unchanged: not decoded)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="map-follower")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._store.close()

    def saw_epoch(self, epoch: int) -> None:
        """A request said its client holds map `epoch`: poll now if that is newer than ours."""
        if epoch > self.epoch:
            self._wake.set()

    async def _run(self) -> None:
        while True:
            await self.poll()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_SECONDS)
            self._wake.clear()

    async def poll(self) -> None:
        try:
            if self._seed and await self._store.seed(self._start):
                log.info("seeded the metadata group with the cluster map (epoch %d)", self._start.epoch)
            self._seed = False
            stored, self._revision = await self._store.read(unless_revision=self._revision)
        except errors.KvError as exc:
            self._report(f"the metadata group is unreachable ({exc.kind}: {exc.message})")
            return
        self._report("")
        if stored is not None and stored.epoch > self.epoch:
            self._take(stored)

    def _take(self, new: ClusterMap) -> None:
        try:
            new.slots  # noqa: B018 (a map that does not hold together is refused here, not per request)
            if not self._adopt(new):
                return
        except errors.KvError as exc:
            self._report(f"cluster map epoch {new.epoch} refused: {exc.message}")
            return
        log.info("cluster map epoch %d -> %d (from the metadata group)", self.epoch, new.epoch)
        self.epoch = new.epoch
        if self._cache is not None:
            try:
                new.save(self._cache)
            except OSError as exc:
                log.warning("could not cache the cluster map in %s: %s", self._cache, exc)

    def _report(self, trouble: str) -> None:
        if trouble and not self._trouble:
            log.warning("%s; serving under cluster map epoch %d", trouble, self.epoch)
        elif not trouble and self._trouble:
            log.info("the metadata group answers again (cluster map epoch %d)", self.epoch)
        self._trouble = trouble
