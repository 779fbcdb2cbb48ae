"""Typed fields of the format's JSON documents, read from untrusted bytes: every helper raises
:class:`ManifestError` with where the bad value sits; the writer list and writer runs of a commit
point, read and written. Imports nothing of the package."""

from __future__ import annotations

from typing import Any


class ManifestError(ValueError):
    """Raised by ``from_dict`` on malformed input; wrapped into ``FormatError`` by callers."""


def _req(d: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(d, dict):
        raise ManifestError(f"{where}: expected an object, got {type(d).__name__}")
    if key not in d:
        raise ManifestError(f"{where}: missing field {key!r}")
    value = d[key]
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ManifestError(f"{where}.{key}: expected {_kind_name(kind)}, got {type(value).__name__}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__


def _int_tuple(value: Any, where: str, *, minimum: int = 0) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise ManifestError(f"{where}: expected a list of integers")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ManifestError(f"{where}: expected integers >= {minimum}, got {v!r}")
        out.append(v)
    return tuple(out)


def _nonnegative_ints(values: list) -> bool:
    if len(values) == 2:  # a chunk index of a matrix: the common case, without a generator
        a, b = values
        return type(a) is int and type(b) is int and a >= 0 and b >= 0
    return all(type(v) is int and v >= 0 for v in values)


def _float(value: Any, where: str) -> float:
    try:
        return float(value)
    except OverflowError:  # an integer too large for a float: JSON allows it
        raise ManifestError(f"{where}: number out of range") from None


def _str_list(v: Any, where: str) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ManifestError(f"{where}: expected a list of strings")
    return v


def _containers(v: Any, where: str) -> dict[str, Any]:  # {path: "list" | "tuple" | "int" | [int keys]}
    if not isinstance(v, dict) or not all(x in ("list", "tuple", "int") or isinstance(x, list) and all(
            isinstance(k, str) for k in x) for x in v.values()):
        raise ManifestError(f"{where}: expected an object of 'list', 'tuple', 'int' or lists of keys")
    return v


def runs_from_json(v: Any, where: str, writers: int) -> dict[str, tuple[tuple[int, int, int, int, int], ...]]:
    if not isinstance(v, dict):
        raise ManifestError(f"{where}: expected an object")
    out = {}
    for path, runs in v.items():
        if not isinstance(runs, list):
            raise ManifestError(f"{where}[{path!r}]: expected a list of runs")
        parsed = []
        for r in runs:
            run = tuple(r) if type(r) is list and _nonnegative_ints(r) else _int_tuple(r, f"{where}[{path!r}]")
            if len(run) != 5 or run[1] < 1 or run[4] < 1:
                raise ManifestError(f"{where}[{path!r}]: a run is [first, count, writer, stride, per], count and per >= 1")
            last = run[2] + run[3] * ((run[1] - 1) // run[4])
            if run[2] >= writers or last >= writers:
                raise ManifestError(f"{where}[{path!r}]: a run names a writer beyond the {writers} writers")
            parsed.append(run)
        out[path] = tuple(parsed)  # type: ignore[arg-type]
    return out


def writer_name(rank: int) -> str:
    return f"rank{rank:05d}"


def writers_to_json(writers: tuple[str, ...]) -> Any:
    """Ranks 0..N-1 (every save of a job) as their count; any other list as it is."""
    if writers and all(w == writer_name(i) for i, w in enumerate(writers)):
        return {"ranks": len(writers)}
    return list(writers)


def writers_from_json(v: Any, where: str) -> tuple[str, ...]:
    if isinstance(v, dict):
        n = v.get("ranks")
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 10**7:
            raise ManifestError(f"{where}: expected {{'ranks': N}}")
        return tuple(writer_name(i) for i in range(n))
    if not all(isinstance(w, str) for w in v):
        raise ManifestError(f"{where}: expected a list of strings")
    return tuple(v)
