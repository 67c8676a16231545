"""Training inputs prepared off the training thread: reading shards, decoding and resizing images,
tokenising, packing and collating run in `torch.utils.data.DataLoader` workers, steps ahead.

Exactly resumable. Step s's inputs depend only on the data position of step s (the Mixture's
windows: s x the batch size of each type) and on s (every random choice is seeded by the step or
by (step, sample)), so worker w of W prepares steps start + w, start + w + W, ... from its own
copy of the Mixture, advanced to each of its steps without reading what it skips, and the
DataLoader hands the steps over in order. The training process advances its Mixture by one step
per step it takes (positions only, nothing is read), so a checkpoint saves exactly the position
of what was trained on, however far ahead the workers are.

`runtime.loader_workers = 0` prepares each step in the training process, just before it runs.
"""

from __future__ import annotations

import pickle
import signal
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from emu.train.data import Mixture

#: (samples of one rank for one step, step) -> what the step function runs (a PreparedStep, or the samples)
Prepare = Callable[[list, int], Any]


@dataclass
class _Failure:
    """An exception raised in a worker, carried to the training process to be raised there as
    itself (or, if it cannot be pickled, as a RuntimeError naming its type and message)."""

    error: BaseException
    trace: str

    @classmethod
    def of(cls, exc: Exception) -> _Failure:
        try:
            pickle.loads(pickle.dumps(exc))
        except Exception:  # noqa: BLE001 - an exception that does not survive the trip
            exc = RuntimeError(f"{type(exc).__name__}: {exc}")
        return cls(exc, traceback.format_exc())

    def raise_it(self) -> None:
        self.error.add_note(f"raised in a data loader worker:\n{self.trace}")
        raise self.error


class _Steps(IterableDataset):
    """This worker's steps, prepared from its own copy of the Mixture (module docstring)."""

    def __init__(self, data: Mixture, prepare: Prepare, start: int, steps: int):
        self.data, self.prepare, self.start, self.steps = data, prepare, start, steps

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        info = get_worker_info()
        worker, workers = info.id, info.num_workers
        self.data.advance(worker)
        for step in range(self.start + worker, self.steps, workers):
            try:
                yield step, self.prepare(self.data.next_batch(), step)
            except Exception as exc:  # noqa: BLE001 - every failure must reach the training process
                yield step, _Failure.of(exc)
                return
            self.data.advance(workers - 1)


def _as_is(item):
    """No conversion: the DataLoader would turn tuples into lists and arrays into tensors."""
    return item


def _ignore_sigterm(worker_id: int) -> None:
    """Workers ignore SIGTERM: a preempted pod signals the whole process group, and the training
    process must finish its step and checkpoint (emu.train.trainer) before the workers go."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class StepLoader:
    """Iterates (step, prepared inputs) for steps [start, steps) of this rank."""

    def __init__(self, data: Mixture, prepare: Prepare, start: int, steps: int, workers: int = 0,
                 prefetch: int = 2, pin_memory: bool | None = None):
        self.data, self.prepare, self.start, self.steps = data, prepare, start, steps
        self.workers, self.prefetch = workers, prefetch
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        if self.workers == 0:
            for step in range(self.start, self.steps):
                yield step, self.prepare(self.data.next_batch(), step)
            return
        loader = DataLoader(_Steps(self.data, self.prepare, self.start, self.steps), batch_size=None,
                            collate_fn=_as_is, num_workers=self.workers, prefetch_factor=self.prefetch,
                            pin_memory=self.pin_memory,
                            # fork: workers start from this process's state (the Mixture, the
                            # tokenizer, an open precompute store) without pickling it
                            multiprocessing_context="fork", worker_init_fn=_ignore_sigterm)
        for step, prepared in loader:
            if isinstance(prepared, _Failure):
                prepared.raise_it()
            self.data.advance(1)  # the training process's position follows what it takes
            yield step, prepared
