"""Scheduling policies: which waiting request is admitted next, and which running request is
preempted first when the pool runs out.

``--scheduling-policy`` picks one of three; each keeps the waiting queue in its own order:

* **fcfs**: arrival order. A preempted request goes back to the head of the queue.
* **priority**: the request's ``priority`` (lower first, as vLLM's field), arrival order
  within a level. Preemption takes the lowest priority first (the latest arrival within it),
  and running requests get their tokens in priority order, so the victim is never one the
  step already scheduled.
* **fair**: the Virtual Token Counter of Sheng et al., "Fairness in Serving Large Language
  Models" (OSDI 2024). Every client (``Request.client``: its adapter, or its user) has a
  counter of the service it received, in weighted tokens: ``input_token_weight`` per prompt
  token, charged when its request is admitted, and ``output_token_weight`` per generated
  token, charged as it is generated, each times the request's ``token_cost`` (its adapter's
  rank factor, below). Admission always takes the head request of the client with the
  smallest counter (ties in arrival order). A client that arrives with nothing waiting has
  its counter lifted to the smallest counter among the clients that are waiting (or, when
  none is, among those running, or else to the counter of the client admitted last), so
  idling earns no credit. Over any
  interval in which two clients stay backlogged, the weighted service they receive differs
  by at most ``2 · max(input_token_weight · L · c, output_token_weight · M · c)``, where L
  is the longest prompt, M the most tokens the running batch can hold and c the largest
  ``token_cost`` (the paper's Theorem 4.4, with costs scaled by c). Preemption takes the
  newest request of the client with the largest counter.

Rank-aware cost. A rank-r adapter adds ``2·r·(in + out)`` multiply-adds per token to every
layer it targets, against ``2·in·out`` for the base layer: :attr:`AdapterEntry.flops_ratio
<adapters.registry.AdapterEntry>` is that sum over its modules divided by the base's linear
work. :func:`token_cost` prices it as ``1 + RANK_COST_COEFFICIENT · flops_ratio``: the
coefficient is the measured time of the LoRA path per unit of its arithmetic, relative to the
base's (the LoRA matmuls are narrow and gather their rows from pool pages, so a flop of LoRA
costs more than a flop of the base): ``docs/scheduling.md`` shows the measurement.

The scheduler also keeps a :class:`ClientLedger` under every policy: prompt tokens admitted
and tokens generated per client, for the metrics, with at most :data:`MAX_CLIENT_LABELS`
clients named (the first seen) and the rest summed under :data:`OTHER_CLIENTS`.
"""

from __future__ import annotations

import heapq
import itertools
from abc import ABC, abstractmethod
from bisect import insort
from collections import OrderedDict, deque
from collections.abc import Iterator, Mapping, Sequence

from engine.config import SchedulerConfig
from engine.request import Request

# The LoRA path's time per unit of its arithmetic, over the base model's: the median decode
# fit on the CPU reference path (``benchmarks/rank_cost.py``; ``docs/scheduling.md``).
RANK_COST_COEFFICIENT = 2.0
MAX_CLIENT_LABELS = 32  # clients named in the metrics; the rest are summed
OTHER_CLIENTS = "(other)"
_MAX_IDLE_CLIENTS = 4096  # idle clients whose counters the fair policy remembers


def token_cost(flops_ratio: float) -> float:
    """What one token of a request costs its client, relative to a base-model token."""
    return 1.0 + RANK_COST_COEFFICIENT * flops_ratio


class Policy(ABC):
    """The waiting queue, kept in one policy's order, and the policy's preemption victim.

    The scheduler calls :meth:`add` for a new request, :meth:`requeue` for a preempted one,
    :meth:`remove` when a waiting request is admitted or aborted, :meth:`admitted` and
    :meth:`generated` as requests are served, and :meth:`finished` when one ends.
    """

    def __init__(self) -> None:
        self._seqs = itertools.count()

    def add(self, request: Request) -> None:
        """Queue a new request."""
        request.seq = next(self._seqs)
        self._push(request)

    @abstractmethod
    def _push(self, request: Request) -> None: ...

    @abstractmethod
    def requeue(self, request: Request) -> None:
        """Queue a preempted request again, where its arrival places it."""

    @abstractmethod
    def remove(self, request: Request) -> None: ...

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def order(self) -> Iterator[Request]:
        """The waiting requests in admission order, lazily: the scheduler may admit (and
        :meth:`remove`) each as it is yielded, and the order of the rest may follow from
        that (the fair policy charges a client on admission)."""

    def peek(self, n: int) -> list[Request]:
        """The first ``n`` requests in admission order (for prefetching their adapters)."""
        return list(itertools.islice(self.order(), n))

    def admitted(self, request: Request, first: bool) -> None:  # noqa: B027 (a hook)
        """``request`` was admitted to run (``first``: for the first time, not after a
        preemption)."""

    def generated(self, request: Request) -> None:  # noqa: B027 (a hook)
        """``request`` generated one token."""

    def finished(self, request: Request) -> None:  # noqa: B027 (a hook)
        """``request`` ended (finished or aborted, waiting or running)."""

    def running_order(self, running: list[Request]) -> Sequence[Request]:
        """The order in which running requests get their tokens in a step."""
        return running

    @abstractmethod
    def victim(self, running: list[Request]) -> Request:
        """The running request to preempt first."""

    def counters(self) -> Mapping[str, float]:
        """Each client's virtual token counter, live (the fair policy's; empty otherwise)."""
        return {}


class FcfsPolicy(Policy):
    """First come, first served; a preempted request goes back to the head of the queue."""

    def __init__(self) -> None:
        super().__init__()
        self._queue: deque[Request] = deque()

    def _push(self, request: Request) -> None:
        self._queue.append(request)

    def requeue(self, request: Request) -> None:
        self._queue.appendleft(request)

    def remove(self, request: Request) -> None:
        self._queue.remove(request)

    def __len__(self) -> int:
        return len(self._queue)

    def order(self) -> Iterator[Request]:
        return iter(list(self._queue))

    def peek(self, n: int) -> list[Request]:
        return list(itertools.islice(self._queue, n))

    def victim(self, running: list[Request]) -> Request:
        return running[-1]  # the newest admitted


class PriorityPolicy(Policy):
    """Lower ``priority`` first, arrival order within a level; preempts the lowest first."""

    def __init__(self) -> None:
        super().__init__()
        self._queue: list[tuple[int, int, Request]] = []  # sorted by (priority, seq)

    def _push(self, request: Request) -> None:
        insort(self._queue, (request.priority, request.seq, request), key=_rank)

    def requeue(self, request: Request) -> None:
        self._push(request)  # its seq keeps its place among its level's arrivals

    def remove(self, request: Request) -> None:
        self._queue.remove((request.priority, request.seq, request))

    def __len__(self) -> int:
        return len(self._queue)

    def order(self) -> Iterator[Request]:
        return iter([r for _, _, r in self._queue])

    def peek(self, n: int) -> list[Request]:
        return [r for _, _, r in self._queue[:n]]

    def running_order(self, running: list[Request]) -> Sequence[Request]:
        return sorted(running, key=_priority_key)

    def victim(self, running: list[Request]) -> Request:
        return max(running, key=_priority_key)


class FairPolicy(Policy):
    """The Virtual Token Counter (see the module's docstring)."""

    def __init__(self, input_weight: float, output_weight: float) -> None:
        super().__init__()
        self.input_weight = input_weight
        self.output_weight = output_weight
        self._queues: dict[str, deque[Request]] = {}  # clients with waiting requests
        self._counters: dict[str, float] = {}
        self._unfinished: dict[str, int] = {}  # requests per client, waiting or running
        self._idle: OrderedDict[str, None] = OrderedDict()  # oldest first
        self._last = 0.0  # the counter of the client admitted last
        self._len = 0

    def _push(self, request: Request) -> None:
        client = request.client
        if client not in self._queues:
            # Nothing of this client waits: no credit for the time it had nothing to ask.
            self._counters[client] = max(self._counters.get(client, 0.0), self._lift(client))
        self._idle.pop(client, None)
        self._unfinished[client] = self._unfinished.get(client, 0) + 1
        self._queues.setdefault(client, deque()).append(request)
        self._len += 1

    def _lift(self, client: str) -> float:
        """Where a client arriving with nothing waiting starts: level with the least served
        of the clients that wait, or, when none does, of those being served, or else with
        the client admitted last."""
        if self._queues:
            return min(self._counters[c] for c in self._queues)
        serving = [self._counters[c] for c in self._unfinished if c != client]
        return min(serving, default=self._last)

    def requeue(self, request: Request) -> None:
        queue = self._queues.setdefault(request.client, deque())
        # Back among its client's requests where its arrival puts it (usually the head).
        at = next((i for i, r in enumerate(queue) if r.seq > request.seq), len(queue))
        queue.insert(at, request)
        self._len += 1

    def remove(self, request: Request) -> None:
        queue = self._queues[request.client]
        queue.remove(request)
        if not queue:
            del self._queues[request.client]
        self._len -= 1

    def __len__(self) -> int:
        return self._len

    def order(self) -> Iterator[Request]:
        # A heap of each client's next request by (counter, arrival); only the client just
        # yielded can have been charged since, so it alone is pushed back with a new key.
        cursors = {c: iter(list(q)) for c, q in self._queues.items()}
        heap = [(self._counters[c], q[0].seq, c) for c, q in self._queues.items()]
        heapq.heapify(heap)
        heads = {c: q[0] for c, q in self._queues.items()}
        for cursor in cursors.values():
            next(cursor)
        while heap:
            _, _, client = heapq.heappop(heap)
            yield heads[client]
            following = next(cursors[client], None)
            if following is not None:
                heads[client] = following
                heapq.heappush(heap, (self._counters[client], following.seq, client))

    def admitted(self, request: Request, first: bool) -> None:
        if first:
            cost = self.input_weight * len(request.prompt_token_ids) * request.token_cost
            self._counters[request.client] += cost
        self._last = self._counters[request.client]

    def generated(self, request: Request) -> None:
        self._counters[request.client] += self.output_weight * request.token_cost

    def finished(self, request: Request) -> None:
        client = request.client
        left = self._unfinished[client] - 1
        if left:
            self._unfinished[client] = left
            return
        del self._unfinished[client]
        self._idle[client] = None
        if len(self._idle) > _MAX_IDLE_CLIENTS:
            forgotten, _ = self._idle.popitem(last=False)
            del self._counters[forgotten]

    def victim(self, running: list[Request]) -> Request:
        return max(running, key=lambda r: (self._counters[r.client], r.seq))

    def counters(self) -> Mapping[str, float]:
        return self._counters


def make_policy(config: SchedulerConfig) -> Policy:
    if config.policy == "fair":
        return FairPolicy(config.input_token_weight, config.output_token_weight)
    if config.policy == "priority":
        return PriorityPolicy()
    return FcfsPolicy()


class ClientLedger:
    """Tokens served per client, under every policy, with a bounded set of names."""

    def __init__(self, max_labels: int = MAX_CLIENT_LABELS) -> None:
        self.max_labels = max_labels
        self.prompt_tokens: dict[str, int] = {}
        self.output_tokens: dict[str, int] = {}
        self._named: set[str] = set()

    def label(self, client: str) -> str:
        """The client's name in the metrics: itself if named, else the rest's."""
        return client if client in self._named else OTHER_CLIENTS

    def _name(self, client: str) -> str:
        """:meth:`label`, naming the client if names are left (the engine thread)."""
        if client not in self._named and len(self._named) < self.max_labels:
            self._named.add(client)
        return self.label(client)

    def admitted(self, request: Request) -> None:
        label = self._name(request.client)
        self.prompt_tokens[label] = self.prompt_tokens.get(label, 0) + len(request.prompt_token_ids)
        self.output_tokens.setdefault(label, 0)

    def generated(self, request: Request) -> None:
        label = self.label(request.client)
        self.output_tokens[label] = self.output_tokens.get(label, 0) + 1

    def labelled(self, counters: Mapping[str, float]) -> dict[str, float]:
        """``counters`` by metric label (clients past the named ones: their largest); any
        thread."""
        out: dict[str, float] = {}
        for client, value in counters.items():
            label = self.label(client)
            out[label] = max(out.get(label, 0.0), value)
        return out


def _rank(entry: tuple[int, int, Request]) -> tuple[int, int]:
    return entry[0], entry[1]


def _priority_key(request: Request) -> tuple[int, int]:
    return request.priority, request.seq
