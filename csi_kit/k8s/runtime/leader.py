"""Lease-based leader election (coordination.k8s.io/v1), client-go's algorithm.

A candidate reads the Lease; it may take it when nobody holds it or when the
record has not changed for `lease_duration` as timed by the candidate's own
clock (clocks of different machines are never compared: the holder's
renewTime is only used to notice that something changed).  The leader renews
every `retry_period`; if it cannot renew for `renew_deadline` it stops its loops
before anyone else may take over (renew_deadline < lease_duration), then
campaigns again.  On a clean stop the lease is released so a successor need
not wait out the duration.  Every write carries the resourceVersion it read,
so two candidates cannot both win.

Give it its own API client (not the throttled one the loops use), so that a
burst of loop traffic cannot make the leader miss its renewals.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from csi_kit.k8s.objects.resources import LEASE
from csi_kit.k8s.objects.times import micro_time
from csi_kit.k8s.runtime.api import ApiError, KubeAPI, Obj, is_not_found, rv_of

log = logging.getLogger(__name__)


class LeaderElector:
    def __init__(
        self,
        api: KubeAPI,
        *,
        lease_name: str,
        namespace: str,
        identity: str,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 5.0,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        if not retry_period < renew_deadline < lease_duration:
            raise ValueError("need retry_period < renew_deadline < lease_duration")
        self.api = api
        self.lease_name = lease_name
        self.namespace = namespace
        self.identity = identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.on_change = on_change
        self.is_leader = False
        self._observed: tuple[str, str, str] | None = None
        self._observed_at = 0.0

    def _set_leader(self, value: bool) -> None:
        if value != self.is_leader:
            self.is_leader = value
            log.info(
                "lease %s/%s: %s %s",
                self.namespace,
                self.lease_name,
                self.identity,
                "acquired" if value else "lost",
            )
            if self.on_change is not None:
                self.on_change(value)

    def _spec(self, lease: Obj | None, transitions: int, acquire_time: str) -> dict[str, object]:
        now = micro_time()
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self.lease_duration)),
            "acquireTime": acquire_time or now,
            "renewTime": now,
            "leaseTransitions": transitions,
        }

    async def try_acquire_or_renew(self) -> bool:
        """One attempt; True when this candidate holds the lease afterwards."""
        try:
            lease = await self.api.get(LEASE, self.lease_name, self.namespace)
        except ApiError as e:
            if not is_not_found(e):
                log.warning("lease %s: %s", self.lease_name, e)
                return False
            body = {
                "apiVersion": LEASE.api_version,
                "kind": LEASE.kind,
                "metadata": {"name": self.lease_name, "namespace": self.namespace},
                "spec": self._spec(None, 0, ""),
            }
            try:
                await self.api.create(LEASE, body, self.namespace)
            except ApiError as e2:
                log.info("lease %s: create lost: %s", self.lease_name, e2)
                return False
            self._observed_at = time.monotonic()
            return True
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        record = (holder, str(spec.get("renewTime") or ""), rv_of(lease))
        now = time.monotonic()
        if record != self._observed:
            self._observed, self._observed_at = record, now
        if holder and holder != self.identity and now < self._observed_at + self.lease_duration:
            return False
        transitions = int(spec.get("leaseTransitions") or 0)
        acquire_time = str(spec.get("acquireTime") or "")
        if holder != self.identity:
            transitions += 1
            acquire_time = ""
        lease["spec"] = self._spec(lease, transitions, acquire_time)
        try:
            updated = await self.api.update(LEASE, lease)
        except ApiError as e:
            log.info("lease %s: update failed: %s", self.lease_name, e)
            return False
        s = updated.get("spec") or {}
        self._observed = (self.identity, str(s.get("renewTime") or ""), rv_of(updated))
        self._observed_at = time.monotonic()
        return True

    async def release(self) -> None:
        try:
            lease = await self.api.get(LEASE, self.lease_name, self.namespace)
            if (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            lease["spec"]["holderIdentity"] = None
            lease["spec"]["leaseDurationSeconds"] = 1
            lease["spec"]["renewTime"] = micro_time()
            await self.api.update(LEASE, lease)
        except ApiError as e:
            log.info("lease %s: release failed: %s", self.lease_name, e)

    async def _renew_until_lost(self) -> None:
        last_ok = time.monotonic()
        while True:
            await asyncio.sleep(self.retry_period)
            if await self.try_acquire_or_renew():
                last_ok = time.monotonic()
            elif time.monotonic() - last_ok >= self.renew_deadline:
                return

    async def run(self, body: Callable[[], Coroutine[Any, Any, None]], stop: asyncio.Event) -> None:
        """Campaign, run `body` while leading, stop it when the lease is lost; return once `stop` is set."""
        stopper = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                if not await self.try_acquire_or_renew():
                    await asyncio.wait({stopper}, timeout=self.retry_period)
                    continue
                self._set_leader(True)
                work = asyncio.create_task(body())
                renew = asyncio.create_task(self._renew_until_lost())
                try:
                    await asyncio.wait({work, renew, stopper}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for t in (work, renew):
                        t.cancel()
                    await asyncio.gather(work, renew, return_exceptions=True)
                    self._set_leader(False)
                if work.done() and not work.cancelled():
                    exc = work.exception()
                    if exc is not None:
                        raise exc
                if stop.is_set():
                    await self.release()
        finally:
            stopper.cancel()
