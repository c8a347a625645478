"""One decision, one write, one push when a script runs under ``accelerate launch``.

Every process of a launched run scores models (the Evaluator splits the data and gathers the
results), so every process takes the same decisions from the same gathered numbers. Work with
side effects is different: a folder must be written once and a push made once.

- :func:`on_main_process` runs a function on the main process only; the other processes wait
  for it and get its result, or raise its error, so a failed save ends every process with that
  error instead of leaving them waiting.
- :func:`check_agreement` compares a decision (greedy's kept set, the chosen alpha) across
  processes and raises when they differ, which would otherwise write a model that no single
  process chose.
- :func:`is_main_process` tells the command line where to print.

In a plain single-process run each of these is a plain call: Accelerate is not asked for its
state and ``torch.distributed`` is never initialised.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
from collections.abc import Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from hf_soups import errors
from hf_soups.errors import HfSoupsError, MainProcessError, ProcessesDisagreeError

if TYPE_CHECKING:
    from accelerate import PartialState

__all__ = ["check_agreement", "is_main_process", "main_process_only", "on_main_process"]

T = TypeVar("T")

# The environment variables a launcher sets to the number of processes (torchrun, MPI).
_WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
# Set while the main process runs work for all: calls nested in it must not wait for the others.
_running_for_all: ContextVar[bool] = ContextVar("hf_soups_running_for_all", default=False)
_MAX_SHOWN = 200  # characters of each process's value in a disagreement message


def _launched_processes() -> int:
    for variable in _WORLD_SIZE_VARIABLES:
        value = os.environ.get(variable, "")
        if value.isdigit():
            return int(value)
    return 1


def _state() -> PartialState | None:
    """Accelerate's state when this process is one of several, else ``None``."""
    if _running_for_all.get():
        return None
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    processes = torch.distributed.get_world_size() if initialized else _launched_processes()
    if processes <= 1:
        return None
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # An Accelerator made earlier (the Evaluator's) has set the state up; this only chooses
    # the device when nothing has yet.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    if state.num_processes != processes:
        raise HfSoupsError(
            f"{processes} processes were launched but Accelerate runs this one alone, so each "
            "would write its own copy; on CPU create Accelerator(cpu=True) before any "
            "Evaluator, or launch with ACCELERATE_USE_CPU=1"
        )
    return state


def is_main_process() -> bool:
    """Whether this process prints and writes: the main one, or the only one."""
    state = _state()
    return state is None or state.is_main_process


def on_main_process(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` once, on the main process, and give every process its result.

    The other processes wait until it is done (the broadcast of its outcome is the barrier), so
    a folder ``fn`` wrote is complete when they return. If ``fn`` raises on the main process,
    it raises there as it is, and every other process raises the same message: the same class
    when it is one of :mod:`hf_soups.errors`, else :class:`~hf_soups.errors.MainProcessError`.
    The result is sent to the other processes by pickling, so it must be picklable (a path, a
    commit). Calls nested in ``fn`` run as plain calls. Single process: ``fn(*args, **kwargs)``.
    """
    state = _state()
    if state is None:
        return fn(*args, **kwargs)
    from accelerate.utils import broadcast_object_list

    outcome: list[Any] = [None]
    failure: Exception | None = None
    if state.is_main_process:
        token = _running_for_all.set(True)
        try:
            result = fn(*args, **kwargs)
            pickle.dumps(result)  # an unpicklable result must fail here, not in the broadcast
            outcome[0] = ("result", result)
        except Exception as error:
            failure = error
            outcome[0] = ("error", type(error).__name__, str(error))
        finally:
            _running_for_all.reset(token)
    broadcast_object_list(outcome, from_process=0)
    if failure is not None:
        raise failure
    kind, *payload = outcome[0]
    if kind == "error":
        raise _same_error(*payload)
    return payload[0]


def main_process_only(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorate a function that writes or uploads so that it runs as :func:`on_main_process`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        return on_main_process(fn, *args, **kwargs)

    return wrapper


def _same_error(name: str, message: str) -> Exception:
    error_class = getattr(errors, name, None)
    if isinstance(error_class, type) and issubclass(error_class, HfSoupsError):
        return error_class(message)
    return MainProcessError(f"the main process raised {name}: {message}")


def check_agreement(value: Any, what: str) -> None:
    """Raise if the processes of a launched run hold different ``value``s for a decision.

    ``value`` is compared through its JSON text (floats exactly), gathered from every process,
    so every process raises together. Single process: returns at once.

    Raises:
        ProcessesDisagreeError: naming ``what`` and each process's value.
    """
    state = _state()
    if state is None:
        return
    from accelerate.utils import gather_object

    fingerprint = json.dumps(value, sort_keys=True, default=repr)
    fingerprints = gather_object([fingerprint])
    if len(set(fingerprints)) > 1:
        shown = "; ".join(
            f"process {rank}: {text[:_MAX_SHOWN]}" for rank, text in enumerate(fingerprints)
        )
        raise ProcessesDisagreeError(f"processes disagree on {what}: {shown}")
