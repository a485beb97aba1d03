"""SLURM's compact host lists and per-node counts, in pure Python.

`expand("gpu[001-003,010],login1")` -> gpu001 gpu002 gpu003 gpu010 login1 (what `scontrol show
hostnames` prints, tested against it), `compress` goes back, and `expand_counts("2(x3),1")` reads
SLURM_TASKS_PER_NODE-style lists -> [2, 2, 2, 1].
"""

from __future__ import annotations

import re
from itertools import product

from pretrain.errors import LaunchError


class HostlistError(LaunchError, ValueError):
    """A host list or count list that SLURM would not have written."""


def _split_top(text: str) -> list[str]:
    """Split at commas that are not inside brackets."""
    parts: list[str] = []
    depth, start = 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise HostlistError(f"unbalanced ']' in host list {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise HostlistError(f"unbalanced '[' in host list {text!r}")
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_range(body: str, whole: str) -> list[str]:
    out: list[str] = []
    for item in body.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise HostlistError(f"bad range {item!r} in host list {whole!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise HostlistError(f"descending range {item!r} in host list {whole!r}")
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return out


def _expand_one(expr: str, whole: str) -> list[str]:
    # A name may hold several bracketed ranges (rack[1-2]-node[01-04]): the cartesian product, in order.
    pieces: list[list[str]] = []
    pos = 0
    for m in re.finditer(r"\[([^\[\]]*)\]", expr):
        pieces.append([expr[pos : m.start()]])
        pieces.append(_expand_range(m.group(1), whole))
        pos = m.end()
    pieces.append([expr[pos:]])
    if any(ch in "".join(p[0] for p in pieces[::2]) for ch in "[]"):
        raise HostlistError(f"nested or unbalanced brackets in host list {whole!r}")
    return ["".join(parts) for parts in product(*pieces)]


def expand(hostlist: str) -> list[str]:
    """Every host of a SLURM host list expression, in order, duplicates kept (as scontrol does)."""
    hosts: list[str] = []
    for part in _split_top(hostlist):
        hosts.extend(_expand_one(part, hostlist))
    return hosts


def compress(hosts: list[str]) -> str:
    """A short host list for messages: runs of one prefix with consecutive numbers of one width."""
    groups: list[tuple[str, str, list[int], int]] = []  # prefix, suffix, numbers, width
    for host in hosts:
        m = re.fullmatch(r"(.*?)(\d+)(\D*)", host)
        if not m:
            groups.append((host, "", [], 0))
            continue
        prefix, digits, suffix = m.groups()
        last = groups[-1] if groups else None
        if last and last[0] == prefix and last[1] == suffix and last[2] and last[3] == len(digits):
            last[2].append(int(digits))
        else:
            groups.append((prefix, suffix, [int(digits)], len(digits)))
    out = []
    for prefix, suffix, numbers, width in groups:
        if not numbers:
            out.append(prefix)
            continue
        if len(numbers) == 1:
            out.append(f"{prefix}{numbers[0]:0{width}d}{suffix}")
            continue
        ranges, start = [], numbers[0]
        for prev, cur in zip(numbers, [*numbers[1:], None], strict=True):
            if cur != prev + 1:
                ranges.append(
                    f"{start:0{width}d}" if start == prev else f"{start:0{width}d}-{prev:0{width}d}"
                )
                start = cur  # type: ignore[assignment]
        out.append(f"{prefix}[{','.join(ranges)}]{suffix}")
    return ",".join(out)


def expand_counts(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE / SLURM_JOB_CPUS_PER_NODE syntax: '2(x3),1' -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for item in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise HostlistError(f"cannot read per-node counts {spec!r} (expected e.g. '2(x3),1')")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts
