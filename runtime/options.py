"""Type and range checks for every option a user gives, in one place: the API (GenerateOptions.make,
Engine), chat's flags and /set, bench and compile all validate through these, so each bad value gets
the same one-line ValueError wherever it comes from.

Python's bool is an int and float('nan') compares false with everything, so neither `isinstance(x,
int)` nor a range comparison alone refuses True as a count or NaN as a temperature.
"""

from __future__ import annotations

import math
import numbers

INT32_MAX = 2**31 - 1  # the kernels take counts and token ids as int32
FLOAT32_MAX = 3.4028234663852886e38  # temperature and top_p reach the kernels as float32
# The longest sequence an engine or a compile may ask for; TVM's cache indexes pages with int32 and a
# cache is max_batch_size times this, so beyond these it cannot be allocated anyway.
MAX_SEQ_LEN = 2**20
MAX_BATCH_SIZE = 1024


def integer(name: str, value, low: int, high: int | None = INT32_MAX, hint: str = "") -> int:
    """An int (numpy's too, never a bool or a float) in [low, high]; high None: no upper bound."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer{hint}, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if value < low and high in (None, INT32_MAX) else f"between {low} and {high}"
        raise ValueError(f"{name} must be {bounds}{hint}, got {value}")
    return int(value)


def real(name: str, value, low: float, high: float = FLOAT32_MAX, *, low_open: bool = False, hint: str = "") -> float:
    """A finite number (an int or a float, never a bool) in [low, high], or (low, high] when low_open."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number{hint}, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number{hint}, got {value}")
    if value < low or (low_open and value == low) or value > high:
        opening = "(" if low_open else "["
        bounds = f">= {low:g}" if high == FLOAT32_MAX and not low_open else f"in {opening}{low:g}, {high:g}]"
        raise ValueError(f"{name} must be {bounds}{hint}, got {value}")
    return value


def flag(name: str, value) -> bool:
    """True or False, not 1 or "yes"."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def optional_integer(name: str, value, low: int, high: int | None = INT32_MAX, hint: str = "") -> int | None:
    return None if value is None else integer(name, value, low, high, hint)


def optional_real(name: str, value, low: float, high: float = FLOAT32_MAX) -> float | None:
    return None if value is None else real(name, value, low, high)


def stop_strings(stop) -> tuple[str, ...]:
    """None, one string or a list of them; an empty stop string would end every reply at once."""
    stops = (stop,) if isinstance(stop, str) else stop
    if stops is None:
        return ()
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
        raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
    if any(not s for s in stops):
        raise ValueError("stop strings must not be empty (an empty one matches at once); drop it")
    return tuple(stops)


def token_lists(token_ids) -> tuple[list[list[int]], bool]:
    """One prompt's token ids (a list of ints) or a batch (a list of such lists), and whether it was one."""
    if _is_token(token_ids) or not _is_list(token_ids):
        raise ValueError(f"token_ids must be a list of integers or a list of such lists, got {token_ids!r:.80}")
    single = len(token_ids) == 0 or not _is_list(token_ids[0])
    lists = [token_ids] if single else list(token_ids)
    for ids in lists:
        if not _is_list(ids) or not all(_is_token(t) for t in ids):
            raise ValueError(f"token_ids must be a list of integers or a list of such lists, got {ids!r:.80}")
    return [[int(t) for t in ids] for ids in lists], single


def text_prompts(prompt) -> tuple[list[str], bool]:
    """One prompt (a string) or a batch (a list of strings), and whether it was one."""
    if isinstance(prompt, str):
        return [prompt], True
    if not isinstance(prompt, (list, tuple)) or not all(isinstance(p, str) for p in prompt):
        raise ValueError(f"prompt must be a string or a list of strings, got {prompt!r:.80}")
    return list(prompt), False


def _is_token(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_list(value) -> bool:
    """A list, a tuple or a numpy array: what may hold token ids (a string holds characters)."""
    return isinstance(value, (list, tuple)) or getattr(value, "ndim", 0) >= 1
