"""Run the rewards in worker processes while the accelerator works; every item bounded in time.

    with RewardPool(config) as pool:
        handle = pool.submit(completions, answers, extras, lengths)   # returns at once
        ...                                                           # device work
        results = handle.result()                                     # list[RewardResult], in order

Each worker scores one item at a time in its main thread under a soft time limit (timer.py), which
catches slow Python code. The parent enforces the same limit plus a grace period from outside: a
worker stuck in C code (sympy expanding a huge power) or dead is killed, its item scores 0 and is
counted, the items queued behind it go to other workers, and a fresh worker replaces it. Batches
therefore always complete, in order, in time bounded by the limit rather than by the worst item.

Workers start with the 'forkserver' method (a clean, single-threaded server forks them; the trainer
runs JAX threads, so plain fork is unsafe), with the reward modules preloaded so that a replacement
worker is ready in milliseconds; 'spawn' where forkserver is unavailable. As with any non-fork
multiprocessing, a script that creates a pool must do so under `if __name__ == "__main__":`.
Keep `extras` small (ids, a few fields): every item's extras are pickled to a worker.
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing as mp
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing import connection
from typing import Any

from eureka_jax.errors import InputError
from eureka_jax.rewards.compose import (
    ItemScore,
    RewardConfig,
    RewardResult,
    combine,
    failed_item,
    load_user_functions,
    score_item,
)

GRACE_S = 1.0  # the parent kills a worker this long after the soft limit should have fired
PIPELINE_DEPTH = 2  # items queued per worker, so it never waits for the parent between items
PIPELINE_MAX_CHARS = 16_384  # bigger items go only to idle workers (a blocked send is a stall)
MAX_START_FAILURES = 3


def _context() -> mp.context.BaseContext:
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["eureka_jax.rewards.preload"])
        return ctx
    return mp.get_context("spawn")


def _worker_main(conn: connection.Connection, config: RewardConfig) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
    from eureka_jax.rewards import preload  # noqa: F401  (warm-up; a no-op when preloaded)

    user_fns = load_user_functions(config)
    conn.send(("ready",))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        key, (completion, answer, extra, index) = message
        conn.send(("done", key, score_item(completion, answer, extra, index, config, user_fns)))


@dataclass
class _Batch:
    items: list[tuple[str, Any, Mapping[str, Any] | None, int]]
    lengths: list[int | None]
    results: list[RewardResult | None]
    remaining: int
    done: threading.Event = field(default_factory=threading.Event)
    errors: list[str] = field(default_factory=list)
    failure: str | None = None


class RewardHandle:
    """A submitted batch. `result()` blocks until every item is scored."""

    def __init__(self, batch: _Batch):
        self._batch = batch

    def done(self) -> bool:
        return self._batch.done.is_set()

    def result(self, timeout: float | None = None) -> list[RewardResult]:
        """The results in submission order. Raises InputError when a user reward function failed,
        RuntimeError when the pool was closed or its workers cannot start, TimeoutError when
        `timeout` seconds pass first."""
        if not self._batch.done.wait(timeout):
            raise TimeoutError("reward batch not finished")
        if self._batch.failure:
            raise RuntimeError(self._batch.failure)
        if self._batch.errors:
            raise InputError("; ".join(self._batch.errors[:3]))
        return list(self._batch.results)


@dataclass
class _Worker:
    process: Any
    conn: connection.Connection
    inflight: collections.deque = field(default_factory=collections.deque)
    ready: bool = False
    started: float = 0.0  # when the item at the head of `inflight` began


class RewardPool:
    """A pool of reward worker processes (config.num_workers of them, at least one).

    `timeouts` and `restarts` count timed-out items and replaced workers since creation."""

    def __init__(self, config: RewardConfig):
        load_user_functions(config)  # fail here, in the caller, on a bad import path
        self.config = config
        self.timeouts = 0
        self.restarts = 0
        self._ctx = _context()
        self._hard_limit = config.timeout_s + GRACE_S
        self._submitted: collections.deque[_Batch] = collections.deque()
        self._pending: collections.deque[tuple[_Batch, int]] = collections.deque()
        self._batches: list[_Batch] = []
        self._closing = False
        self._broken: str | None = None  # set when workers cannot start; new batches fail
        self._start_failures = 0
        self._wake_recv, self._wake_send = self._ctx.Pipe(duplex=False)
        self._lock = threading.Lock()  # orders submit() against close()
        self._workers = [self._start_worker() for _ in range(max(1, config.num_workers))]
        self._thread = threading.Thread(target=self._loop, name="reward-pool", daemon=True)
        self._thread.start()

    # ---- public API -------------------------------------------------------------------------

    def submit(
        self,
        completions: Sequence[str],
        answers: Sequence[Any],
        extras: Sequence[Mapping[str, Any] | None] | None = None,
        lengths: Sequence[int] | None = None,
    ) -> RewardHandle:
        """Queue a batch; returns at once. `extras[i]` holds record i's other fields (its "id"
        names it in data-error messages; user reward functions receive them all); `lengths[i]`
        is response i's token count, needed for overlong shaping."""
        batch = _make_batch(completions, answers, extras, lengths, self.config)
        with self._lock:
            if self._closing:
                raise RuntimeError("RewardPool is closed")
            if batch.remaining == 0:
                batch.done.set()
            else:
                self._submitted.append(batch)
                self._wake()
        return RewardHandle(batch)

    def close(self) -> None:
        """Stop the workers. Unfinished batches fail with RuntimeError."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._wake()
        self._thread.join()

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the dispatcher thread ----------------------------------------------------------------

    def _wake(self) -> None:  # called with self._lock held
        self._wake_send.send(None)

    def _start_worker(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=_worker_main, args=(child_conn, self.config), name="reward-worker", daemon=True
        )
        process.start()
        child_conn.close()
        return _Worker(process, parent_conn)

    def _loop(self) -> None:
        while not self._closing:
            self._take_submissions()
            if self._broken:
                self._fail_all(self._broken)
            self._dispatch()
            waitables = [self._wake_recv]
            for w in self._workers:
                waitables += [w.conn, w.process.sentinel]
            ready = connection.wait(waitables, timeout=self._until_next_deadline())
            if self._wake_recv in ready:
                while self._wake_recv.poll():
                    self._wake_recv.recv()
            for w in list(self._workers):
                if w.conn in ready or w.process.sentinel in ready:
                    self._read(w)
            self._enforce_deadlines()
        self._shutdown()

    def _take_submissions(self) -> None:
        while self._submitted:
            batch = self._submitted.popleft()
            self._batches.append(batch)
            self._pending.extend((batch, i) for i in range(len(batch.items)))

    def _until_next_deadline(self) -> float | None:
        busy = [w.started for w in self._workers if w.ready and w.inflight]
        if not busy:
            return None
        return max(0.0, min(busy) + self._hard_limit - time.monotonic())

    def _dispatch(self) -> None:
        while self._pending:
            batch, index = self._pending[0]
            small = len(batch.items[index][0]) <= PIPELINE_MAX_CHARS
            depth = PIPELINE_DEPTH if small else 1
            idle = [w for w in self._workers if w.ready and len(w.inflight) < depth]
            if not idle:
                return
            worker = min(idle, key=lambda w: len(w.inflight))
            self._pending.popleft()
            try:
                worker.conn.send((id(batch), batch.items[index]))
            except (OSError, ValueError):
                self._pending.appendleft((batch, index))
                self._replace(worker, "worker crashed")
                continue
            if not worker.inflight:
                worker.started = time.monotonic()
            worker.inflight.append((batch, index))

    def _read(self, worker: _Worker) -> None:
        try:
            while worker.conn.poll():
                message = worker.conn.recv()
                if message[0] == "ready":
                    worker.ready = True
                    self._start_failures = 0
                    continue
                _, key, score = message
                batch, index = worker.inflight.popleft()
                assert key == id(batch), "reward worker answered out of order"
                self._finish(batch, index, score)
                worker.started = time.monotonic()
        except (EOFError, OSError):
            pass
        if not worker.process.is_alive():
            self._replace(worker, "worker crashed")

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        for w in list(self._workers):
            if w.ready and w.inflight and now - w.started > self._hard_limit:
                self._replace(w, "timeout")

    def _replace(self, worker: _Worker, reason: str) -> None:
        """Kill `worker`; its current item scores 0 with `reason`, the rest are requeued."""
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join(timeout=5)
        worker.conn.close()
        self._workers.remove(worker)
        if worker.inflight:
            batch, index = worker.inflight.popleft()
            self._finish(batch, index, failed_item(batch.items[index][0], reason))
            self._pending.extendleft(reversed(worker.inflight))
        if not worker.ready:
            self._start_failures += 1
            if self._start_failures >= MAX_START_FAILURES:
                code = worker.process.exitcode
                self._broken = f"reward workers die on start-up (exit code {code}); see stderr"
                self._fail_all(self._broken)
                return
        self.restarts += 1
        if not self._closing:
            self._workers.append(self._start_worker())

    def _finish(self, batch: _Batch, index: int, score: ItemScore) -> None:
        if score.timed_out:
            self.timeouts += 1
        if score.error:
            batch.errors.append(score.error)
        batch.results[index] = combine(score, batch.lengths[index], self.config)
        batch.remaining -= 1
        if batch.remaining == 0:
            batch.done.set()
            self._batches.remove(batch)

    def _fail_all(self, message: str) -> None:
        for batch in self._batches:
            batch.failure = message
            batch.done.set()
        self._batches.clear()
        self._pending.clear()

    def _shutdown(self) -> None:
        self._take_submissions()
        self._fail_all("RewardPool closed before the batch finished")
        for w in self._workers:
            with contextlib.suppress(OSError):
                w.conn.send(None)
        deadline = time.monotonic() + 2.0
        for w in self._workers:
            w.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                w.process.kill()
                w.process.join()
            w.conn.close()
        self._workers.clear()
        self._wake_recv.close()
        self._wake_send.close()


def _make_batch(completions, answers, extras, lengths, config: RewardConfig) -> _Batch:
    n = len(completions)
    if len(answers) != n:
        raise InputError(f"{n} completions but {len(answers)} answers")
    if extras is not None and len(extras) != n:
        raise InputError(f"{n} completions but {len(extras)} extras")
    if lengths is not None and len(lengths) != n:
        raise InputError(f"{n} completions but {len(lengths)} lengths")
    if lengths is None and config.overlong != "none":
        raise InputError(f"overlong={config.overlong!r} needs the response lengths")
    items = []
    for i, completion in enumerate(completions):
        if not isinstance(completion, str):
            raise InputError(f"completion {i} is {type(completion).__name__}, expected str")
        answer = answers[i]
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        items.append((completion, answer, extras[i] if extras is not None else None, i))
    return _Batch(items, list(lengths) if lengths is not None else [None] * n, [None] * n, n)


def score_batch(
    completions: Sequence[str],
    answers: Sequence[Any],
    extras: Sequence[Mapping[str, Any] | None] | None = None,
    config: RewardConfig | None = None,
    lengths: Sequence[int] | None = None,
) -> list[RewardResult]:
    """Score a batch synchronously: in this process when config.num_workers == 0 (the time limit
    then needs the main thread and cannot stop C code), else in a temporary RewardPool."""
    config = config or RewardConfig()
    if config.num_workers > 0:
        with RewardPool(config) as pool:
            return pool.submit(completions, answers, extras, lengths).result()
    batch = _make_batch(completions, answers, extras, lengths, config)
    user_fns = load_user_functions(config)
    results, errors = [], []
    for (completion, answer, extra, index), length in zip(batch.items, batch.lengths, strict=True):
        score = score_item(completion, answer, extra, index, config, user_fns)
        if score.error:
            errors.append(score.error)
        results.append(combine(score, length, config))
    if errors:
        raise InputError("; ".join(errors[:3]))
    return results
