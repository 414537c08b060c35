"""The processes of `sib study`: its runs one after another, or in N workers (`--jobs N`), and how a study stops.

A study is stopped with SIGTERM (SLURM, `kill`) or SIGINT (Ctrl-C). Under `concurrent.futures`' process pool the
parent died alone and its workers, re-parented to init, went on training into the study folder. Here the study
owns its workers: each is a spawned process that runs the jobs sent to it over a pipe, one at a time, and in
which SIGTERM raises KeyboardInterrupt as SIGINT does, so the trainer stops as after Ctrl-C (its last completed
epoch's checkpoint intact: `--resume`, which the study uses, continues from it; an evaluation keeps its
finished batches) and releases its claims (sib.claim). When the study itself gets either signal it sends
SIGTERM to every worker, waits `GRACE_S` seconds for them (then SIGKILL: checkpoints are atomic, so even then
the last one is intact) and raises `StudyInterrupted` naming the runs that were cut and those not started.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

GRACE_S = 60.0  # how long stopped workers may take to leave their step before they are killed
Job = tuple[str, dict[str, Any]]  # (name, the job's plain-data description)
Report = Callable[[str, dict[str, Any]], None]


class StudyInterrupted(KeyboardInterrupt):
    """The study was stopped by signal `signum`: `cut` runs were in progress, `not_started` never began."""

    def __init__(self, signum: int, cut: list[str], not_started: list[str]) -> None:
        self.signum, self.cut, self.not_started = signum, cut, not_started
        later = f"; not started: {', '.join(not_started)}" if not_started else ""
        super().__init__(f"stopped by {signal.Signals(signum).name}; runs cut: {', '.join(cut) or 'none'} (each keeps "
                         f"its last completed checkpoint and finished evaluation batches: rerun the same command to "
                         f"resume){later}")


@dataclass
class _Stop:
    """The signal that stopped the study (SIGINT until a handler records another)."""

    signum: int = signal.SIGINT
    handlers: dict[int, Any] = field(default_factory=dict)


@contextmanager
def stop_signals() -> Iterator[_Stop]:
    """In this (main) thread, SIGTERM raises KeyboardInterrupt as SIGINT does; the signal is recorded."""
    stop = _Stop()

    def raise_interrupt(signum: int, frame: Any) -> None:
        stop.signum = signum
        raise KeyboardInterrupt

    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            stop.handlers[sig] = signal.signal(sig, raise_interrupt)
    except ValueError:  # not the main thread: signals cannot be handled here, leave them as they are
        pass
    try:
        yield stop
    finally:
        for sig, handler in stop.handlers.items():
            signal.signal(sig, handler)


def _hold_signals(stop: _Stop) -> None:
    """While the workers are being stopped, a second signal is recorded, not raised (the cleanup must finish)."""
    def record(signum: int, frame: Any) -> None:
        stop.signum = signum

    for sig in stop.handlers:
        signal.signal(sig, record)


def run_in_process(jobs: list[Job], fn: Callable[[dict[str, Any]], dict[str, Any]], report: Report) -> None:
    """Run the jobs here, one after another; a signal cuts the current one (StudyInterrupted)."""
    with stop_signals() as stop:
        for k, (name, job) in enumerate(jobs):
            try:
                result = fn(job)
            except KeyboardInterrupt:
                raise StudyInterrupted(stop.signum, [name], [n for n, _ in jobs[k + 1:]]) from None
            report(name, result)


def _worker(conn: multiprocessing.connection.Connection, fn: Callable[[dict[str, Any]], dict[str, Any]],
            threads: int) -> None:
    """A worker process: run the jobs received until None; SIGTERM stops the current job as Ctrl-C would."""
    import torch

    torch.set_num_threads(threads)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # raises KeyboardInterrupt
    try:
        while (job := conn.recv()) is not None:
            conn.send(fn(job))
    except (KeyboardInterrupt, EOFError, BrokenPipeError):
        pass  # stopped, or the study is gone: leave (the trainer has kept its last checkpoint)


@dataclass
class _Worker:
    process: Any
    conn: multiprocessing.connection.Connection
    job: str | None = None  # the name of the job it runs


def run_in_workers(jobs: list[Job], n: int, fn: Callable[[dict[str, Any]], dict[str, Any]], report: Report,
                   threads: int) -> None:
    """Run the jobs in `n` spawned workers (`threads` torch threads each), reporting each result as it comes.

    Raises:
        StudyInterrupted: SIGTERM or SIGINT reached the study: every worker was stopped first.
    """
    ctx = multiprocessing.get_context("spawn")
    pending: deque[Job] = deque(jobs)
    workers: list[_Worker] = []
    with stop_signals() as stop:
        try:
            for _ in range(min(n, len(jobs))):
                workers.append(_start(ctx, fn, threads))
            for w in workers:
                _assign(w, pending)
            while any(w.job is not None for w in workers):
                busy = [w for w in workers if w.job is not None]
                ready = multiprocessing.connection.wait([w.conn for w in busy] + [w.process.sentinel for w in busy])
                for w in busy:
                    if w.conn in ready or w.process.sentinel in ready:
                        report(w.job, _result(w))
                        if not w.process.is_alive():  # died (killed, out of memory): a fresh one takes the next
                            workers[workers.index(w)] = w = _start(ctx, fn, threads)
                        _assign(w, pending)
        except KeyboardInterrupt:
            _hold_signals(stop)
            cut = [w.job for w in workers if w.job is not None]
            _stop_all(workers)
            raise StudyInterrupted(stop.signum, cut, [name for name, _ in pending]) from None
        finally:
            _stop_all(workers)


def _start(ctx: Any, fn: Callable[[dict[str, Any]], dict[str, Any]], threads: int) -> _Worker:
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_worker, args=(child, fn, threads), daemon=False)
    process.start()
    child.close()
    return _Worker(process, parent)


def _assign(w: _Worker, pending: deque[Job]) -> None:
    """Send the worker the next job, or None (leave) when there is none."""
    name, job = pending.popleft() if pending else (None, None)
    w.job = name
    try:
        w.conn.send(job)
    except (BrokenPipeError, OSError):
        w.job = None


def _result(w: _Worker) -> dict[str, Any]:
    """The worker's answer for its job, or an error saying how the worker ended."""
    try:
        if w.conn.poll():
            return w.conn.recv()
    except (EOFError, OSError):
        pass
    w.process.join(timeout=5)
    return {"error": f"the worker process ended (exit code {w.process.exitcode}) before finishing the run"}


def _stop_all(workers: list[_Worker]) -> None:
    """SIGTERM to every live worker, then wait up to GRACE_S for all, then SIGKILL the rest."""
    for w in workers:
        if w.process.is_alive():
            os.kill(w.process.pid, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    for w in workers:
        w.process.join(timeout=max(0.0, deadline - time.monotonic()))
        if w.process.is_alive():
            w.process.kill()
            w.process.join()
        w.conn.close()
