"""Probers: clients whose images are rejected far more often than clean data would be.

An adaptive attacker with query access searches for an input that is misclassified and still
accepted, and that search sends many rejected images near the threshold. Clean traffic is
rejected at about `target_fpr`. So each client (its API key's id, else its address) gets a
sliding-window count of images and rejections, in bounded memory: at most `prober_clients`
clients, each a ring of `SLOTS` counters spanning `prober_window` seconds. When full, the least
recently seen client that is NOT flagged is dropped first; a flagged client goes only when
every tracked client is flagged (so a flood of new or spoofed addresses cannot wash a prober's
flag away). IPv6 addresses count by /64 (one host usually holds a whole /64, so rotating
addresses inside it is one client) and IPv4-mapped IPv6 addresses as their IPv4 address.

A client that sent at least `prober_min_images` images in the window, with a rejection rate of
at least `prober_rejection_rate`, is flagged: one warning line per episode, a counter and a
gauge of flagged clients (never a per-client label). With `prober_throttle` its requests get
429 until its rate over the window falls below the limit.

This raises the cost of a query-based attack and makes it visible; it does not stop one
(an attacker can spread queries over many keys or addresses, or stay under the rate).
"""

from __future__ import annotations

import ipaddress
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from service.errors import Throttled
from service.metrics import Metrics
from service.settings import Settings

logger = logging.getLogger(__name__)

SLOTS = 10


class _Client:
    __slots__ = ("epochs", "flagged", "images", "rejected")

    def __init__(self) -> None:
        self.epochs = [-1] * SLOTS  # which slot period each counter belongs to
        self.images = [0] * SLOTS
        self.rejected = [0] * SLOTS
        self.flagged = False

    def add(self, epoch: int, images: int, rejected: int) -> None:
        i = epoch % SLOTS
        if self.epochs[i] != epoch:
            self.epochs[i], self.images[i], self.rejected[i] = epoch, 0, 0
        self.images[i] += images
        self.rejected[i] += rejected

    def totals(self, epoch: int) -> tuple[int, int]:
        live = [i for i in range(SLOTS) if epoch - SLOTS < self.epochs[i] <= epoch]
        return sum(self.images[i] for i in live), sum(self.rejected[i] for i in live)


class ProberTracker:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.slot_seconds = settings.prober_window / SLOTS
        self.window = settings.prober_window
        self.min_images = settings.prober_min_images
        self.rate = settings.prober_rejection_rate
        self.capacity = settings.prober_clients
        self.throttle = settings.prober_throttle
        self._clock = clock
        # Two LRUs: unflagged clients are evicted first, flagged ones only when none is left.
        self._clients: OrderedDict[str, _Client] = OrderedDict()
        self._probing: OrderedDict[str, _Client] = OrderedDict()  # the flagged ones
        self._lock = threading.Lock()  # adapters may call from more than one thread
        self._flagged_gauge = metrics.flagged_clients
        self.flagged = 0
        self._flags = metrics.prober_flags

    @property
    def flagged(self) -> int:
        """Clients flagged now (also the gauge; set, not a set_function, so that it reaches
        /metrics from every worker process)."""
        return self._flagged

    @flagged.setter
    def flagged(self, count: int) -> None:
        self._flagged = count
        self._flagged_gauge.set(count)

    def _epoch(self) -> int:
        return int(self._clock() // self.slot_seconds)

    def _over(self, images: int, rejected: int) -> bool:
        return images >= self.min_images and rejected >= self.rate * images

    def _set(self, who: str, state: _Client, over: bool, images: int, rejected: int) -> None:
        if over and not state.flagged:
            state.flagged = True
            self.flagged += 1
            self._probing[who] = self._clients.pop(who)
            self._flags.inc()
            logger.warning(
                "client %s flagged as probing: %d of %d images rejected in the last %g s",
                who,
                rejected,
                images,
                self.window,
            )
        elif not over and state.flagged:
            state.flagged = False
            self.flagged -= 1
            self._clients[who] = self._probing.pop(who)

    def check(self, who: str | None) -> None:
        """Raise Throttled for a flagged client when throttling is on."""
        if who is None or not self.throttle:
            return
        who = tracked_name(who)
        with self._lock:
            state = self._probing.get(who)
            if state is None:
                return
            images, rejected = state.totals(self._epoch())
            self._set(who, state, self._over(images, rejected), images, rejected)
            if state.flagged:
                raise Throttled(
                    "too many of this client's images were rejected recently; retry later",
                    retry_after=math.ceil(self.slot_seconds),
                )

    def observe(self, who: str | None, images: int, rejected: int) -> None:
        """Count one answered request: `images` answered, `rejected` of them rejected."""
        if who is None or images <= 0:
            return
        who = tracked_name(who)
        with self._lock:
            lru = self._probing if who in self._probing else self._clients
            state = lru.get(who)
            if state is None:
                if len(self) >= self.capacity:
                    self._evict()
                state = self._clients[who] = _Client()
            else:
                lru.move_to_end(who)
            epoch = self._epoch()
            state.add(epoch, images, rejected)
            total, bad = state.totals(epoch)
            self._set(who, state, self._over(total, bad), total, bad)

    def _evict(self) -> None:
        """Drop the least recently seen unflagged client, or, when all are flagged, the least
        recently seen flagged one."""
        if self._clients:
            self._clients.popitem(last=False)
        else:
            self._probing.popitem(last=False)
            self.flagged -= 1

    def __len__(self) -> int:
        return len(self._clients) + len(self._probing)


def tracked_name(who: str) -> str:
    """The name a client is tracked under: `addr:` IPv6 addresses by their /64 network and
    IPv4-mapped ones as IPv4; API key ids and other names unchanged."""
    if not who.startswith("addr:") or ":" not in who[5:]:
        return who
    try:
        address = ipaddress.IPv6Address(who[5:].split("%")[0])
    except ValueError:
        return who
    if address.ipv4_mapped is not None:
        return f"addr:{address.ipv4_mapped}"
    return f"addr:{ipaddress.IPv6Network((address, 64), strict=False)}"
