"""Continuous batching for ``steerlab serve``: one scheduler thread, one running batch.

A :class:`Batcher` owns the model and a long-lived :class:`steerlab.generation.slots.SlotBatch`
(one slot
per row, a static KV cache). Handler threads :meth:`~Batcher.submit` a :class:`Job` (prompt
ids, token budget, temperature, seed, steering) and read its events. Between decode steps, at
a host check every ``sync_every`` steps, the scheduler reads the state once, hands each row's
new tokens to its job, retires finished rows and rows whose client went away
(:meth:`Job.cancel`: the server cancels a job whose client hung up or whose deadline passed),
and admits waiting jobs into the free slots: a finished row's slot is
refilled by the next request while the others keep decoding. Rows are independent (own cache
position, step counter, limit, seed, temperature and steering deltas), so a reply does not
depend on what else runs. With nothing to do the thread blocks on its queue.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from steerlab.base.compat import ensure_bridge_reads_cache
from steerlab.base.errors import SteerlabError
from steerlab.generation.decode import StepProgram
from steerlab.generation.engine import bucket_capacity
from steerlab.generation.generator import NonFiniteError
from steerlab.generation.slots import SlotBatch
from steerlab.steering.intervention import Steering

__all__ = ["Batcher", "Job"]

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Job:
    """One request's row: what to generate, and the events the scheduler sends back.

    :meth:`events` yields ``("tokens", [ids])`` at each host check that made some, then one
    ``("done", stopped)`` (True: a stop token ended it; False: ``max_tokens`` did) or
    ``("error", exception)``.
    """

    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    seed: int = 0
    steerings: tuple[Steering, ...] = ()  # applied together (see Operator for the order)
    name: str = ""  # for the log
    told: int = 0  # tokens delivered so far (scheduler's side)
    _events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue, repr=False)
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel(self) -> None:
        """Stop this row at the next check (its client went away); no more events."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def events(self) -> Iterator[tuple[str, Any]]:
        """The scheduler's events, blocking until each arrives; ends after the last."""
        while True:
            kind, value = self._events.get()
            yield kind, value
            if kind != "tokens":
                return

    def next_event(self, timeout: float) -> tuple[str, Any] | None:
        """The next event, or None when ``timeout`` seconds pass without one (a server looks
        at its deadline and its client in between)."""
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            return None

    def _put(self, kind: str, value: Any) -> None:
        self._events.put((kind, value))


@dataclass(frozen=True)
class _Task:
    fn: Callable[[], Any]
    future: Future


class Batcher:
    """The scheduler thread and its :class:`~steerlab.generation.slots.SlotBatch` (started at once).

    Args:
        model: a bridge with HF attention (the static engine's requirement).
        slots: rows decoding together (requests beyond them wait for a free slot).
        max_context: most positions a row may use (prompt plus new tokens); the cache holds
            :func:`steerlab.generation.engine.bucket_capacity` of it.
        sync_every: decode steps between host checks (when tokens are delivered and slots
            change hands).

    Examples:
        >>> b = Batcher(model, slots=8, max_context=512)
        >>> job = Job(ids, max_tokens=32)
        >>> b.submit(job)
        >>> [value for kind, value in job.events()]
        >>> b.close()
    """

    def __init__(self, model: Any, *, slots: int = 16, max_context: int = 2048,
                 sync_every: int = 4, graphs: bool = True):
        if slots < 1 or sync_every < 1 or max_context < 2:
            raise SteerlabError(f"slots {slots}, sync_every {sync_every} and max_context "
                                f"{max_context} must be positive (max_context >= 2)")
        ensure_bridge_reads_cache()
        self.model, self.slots, self.max_context = model, slots, max_context
        self.sync_every, self.graphs = sync_every, graphs
        # sampling on: any row may sample (a row at temperature 0 is greedy all the same)
        self.settings = StepProgram.for_model(model, sampling=True)
        self.batch = self._new_batch()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: deque[Job] = deque()
        self._rows: dict[int, Job] = {}  # slot -> job
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="steerlab-batcher", daemon=True)
        self._thread.start()

    def _new_batch(self) -> Any:
        return SlotBatch(self.model, self.slots, bucket_capacity(self.max_context),
                         self.settings, graphs=self.graphs)

    def submit(self, job: Job) -> None:
        """Queue ``job``; it joins the batch at the next check with a free slot."""
        need = len(job.prompt) + job.max_tokens
        if not job.prompt or job.max_tokens < 1 or need > self.max_context:
            raise SteerlabError(f"a prompt of {len(job.prompt)} tokens plus {job.max_tokens} "
                                f"new ones needs {need} positions; max_context is "
                                f"{self.max_context}", field="max_tokens")
        self._put(job)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` on the scheduler thread between checks, with the model free of the
        batch's hooks (e.g. measuring residual norms), and return its result or raise."""
        future: Future = Future()
        self._put(_Task(fn, future))
        return future.result()

    def _put(self, item: Job | _Task | None) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            self._inbox.put(item)

    def close(self, timeout: float = 60.0) -> None:
        """Stop the thread: running and waiting requests end with an error event."""
        try:
            self._put(None)
        except RuntimeError:
            pass  # closed already
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def active(self) -> int:
        """Rows decoding now (read from any thread: a snapshot)."""
        return len(self._rows)

    # -- the scheduler thread -----------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                if not self._rows and not self._waiting:
                    if not self._take(self._inbox.get()):  # idle: block
                        return
                while True:
                    try:
                        item = self._inbox.get_nowait()
                    except queue.Empty:
                        break
                    if not self._take(item):
                        return
                try:
                    with self.batch.running():
                        self._cycle()
                except Exception as err:  # noqa: BLE001 - fail these requests, keep serving
                    log.exception("decoding failed; failing its %d requests", len(self._rows))
                    for job in self._rows.values():
                        job._put("error", err)
                    self._rows.clear()
                    self.batch = self._new_batch()  # a clean state
        except BaseException:
            log.exception("the scheduler stopped")
            raise
        finally:
            self._stop()

    def _take(self, item: Job | _Task | None) -> bool:
        """Handle one inbox item (outside the batch's hooks); False on the stop sentinel."""
        if item is None:
            return False
        if isinstance(item, _Task):
            try:
                item.future.set_result(item.fn())
            except Exception as err:  # noqa: BLE001 - the caller raises it
                item.future.set_exception(err)
        else:
            self._waiting.append(item)
        return True

    def _stop(self) -> None:
        with self._lock:
            self._closed = True
        gone = RuntimeError("the server is shutting down")
        jobs = [*self._rows.values(), *self._waiting]
        self._rows.clear()
        self._waiting.clear()
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Job):
                jobs.append(item)
            elif isinstance(item, _Task):
                item.future.set_exception(gone)
        for job in jobs:
            job._put("error", gone)

    def _cycle(self) -> None:
        """Admit waiting jobs into free slots, run up to ``sync_every`` steps, check."""
        # the lowest free slots first: the occupied ones stay packed at the front, so a step
        # runs over a small bucket of rows (SlotBatch.step_rows), shrinking as the top ones end
        free = [s for s in range(self.slots) if s not in self._rows]
        chosen: list[tuple[int, Job]] = []
        while free and self._waiting:
            job = self._waiting.popleft()
            if not job.cancelled:
                chosen.append((free.pop(0), job))
        for group in self._groups(chosen):
            self._admit(group)
        if not self._rows:
            return
        # a new row made its first token at admission; none needs more than its budget
        ahead = max(job.max_tokens - max(job.told, 1) for job in self._rows.values())
        for _ in range(min(self.sync_every, ahead)):
            self.batch.step()
        self._check()

    def _groups(self, chosen: list[tuple[int, Job]]) -> Iterator[list[tuple[int, Job]]]:
        """Admissions prefilled together: left padding makes every row of a group start
        at the longest prompt, so a group's longest prompt plus largest budget must fit."""
        group: list[tuple[int, Job]] = []
        width = budget = 0
        for slot, job in chosen:
            w, b = max(width, len(job.prompt)), max(budget, job.max_tokens)
            if group and w + b > self.max_context:
                yield group
                group, w, b = [], len(job.prompt), job.max_tokens
            group.append((slot, job))
            width, budget = w, b
        if group:
            yield group

    def _admit(self, group: list[tuple[int, Job]]) -> None:
        slots = [s for s, _ in group]
        jobs = [j for _, j in group]
        try:
            self.batch.admit(
                slots, [j.prompt for j in jobs], limits=[j.max_tokens for j in jobs],
                temps=[j.temperature for j in jobs], seeds=[j.seed for j in jobs],
                steerings=[[s for s in j.steerings if s.active] for j in jobs])
        except Exception as err:  # noqa: BLE001 - fail these requests, keep the others
            log.exception("admitting %d requests failed", len(jobs))
            for job in jobs:
                job._put("error", err)
            self.batch.release(slots)
            return
        for slot, job in group:
            job.told = 0
            self._rows[slot] = job

    def _check(self) -> None:
        """One read of the state: deliver new tokens, retire finished and cancelled rows."""
        st = self.batch.st
        made, active, stopped, broken = torch.stack(
            [st.n_out, st.active.long(), st.hit_stop.long(), st.broken.long()]).tolist()
        slots = sorted(self._rows)
        lo = min(self._rows[s].told for s in slots)
        hi = max(made[s] for s in slots)
        cols = st.tokens[:, lo:hi].tolist() if hi > lo else [[] for _ in range(self.slots)]
        retired = []
        for s in slots:
            job = self._rows[s]
            new = cols[s][job.told - lo : made[s] - lo]
            job.told = made[s]
            if job.cancelled:
                log.info("%s: the client went away after %d of %d tokens; slot %d freed",
                         job.name or "a request", made[s], job.max_tokens, s)
                retired.append(s)
                continue
            if broken[s]:  # this row alone fails; its slot is reset at its next admission
                log.warning("%s: its logits went non-finite after %d tokens; failed alone",
                            job.name or "a request", made[s])
                job._put("error", NonFiniteError([0]))
                retired.append(s)
                continue
            if new:
                job._put("tokens", new)
            if not active[s]:
                job._put("done", bool(stopped[s]))
                retired.append(s)
        if retired:
            self.batch.release(retired)
            for s in retired:
                del self._rows[s]
