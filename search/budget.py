"""Budget strings: BitOPs ("22.8G", "500M", "1.5e9"), weight size ("2.5MB", "800KB", "1.2MiB") or a
ratio of the all-8-bit BitOPs ("0.2").

Rules (no spaces allowed inside a budget):

* a number followed by ``K``, ``M``, ``G`` or ``T`` (decimal: 1e3 .. 1e12, any case), optionally
  followed by ``BitOPs``/``BOPs``, is a BitOPs budget; a plain number above 1 ("1.5e9") too;
* a number followed by ``B``, ``KB``, ``MB``, ``GB`` (decimal) or ``KiB``, ``MiB``, ``GiB`` (binary),
  any case, is a weight-size budget in bytes;
* a plain number in ``(0, 1]`` is a ratio of the BitOPs of every layer at 8/8 bits (where a size
  budget is required, a plain number is a byte count).

Everything else (``"3 GB"``, ``"-1"``, ``"abc"``, ``"0"``, ``""``) raises :class:`mpq.errors.UserError`
naming the value and the accepted formats.

A :class:`Target` is what the search answers: one or more budgets that must all hold together
(``--budget 22.8G --budget-size 2.5MB``), resolved against a supernet's cost model (a ratio becomes
BitOPs); :func:`budget_targets`, :func:`default_target` and :func:`check_reachable` turn the
command line's budgets into targets and refuse the ones no configuration can meet.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from mpq.errors import UserError

ACCEPTED = ("accepted formats: BitOPs like '22.8G', '500M', '1.5e9' (K/M/G/T = 1e3..1e12); "
            "weight size like '2.5MB', '800KB', '1.2MiB' (KB/MB/GB = 1e3.., KiB/MiB/GiB = 1024..); "
            "a ratio of the all-8-bit BitOPs like '0.2' (0 < ratio <= 1); no spaces")

_NUMBER = r"(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"
# re.ASCII: only the digits 0-9 (\d would also take other scripts' digits, which float() reads)
_BITOPS_RE = re.compile(_NUMBER + r"(?P<unit>[kKmMgGtT])(?:bitops|BitOPs|BITOPS|bops|BOPs|BOPS|ops|OPs|OPS)?",
                        re.ASCII)
_SIZE_RE = re.compile(_NUMBER + r"(?P<unit>[kKmMgG]?[iI]?[bB])", re.ASCII)
_PLAIN_RE = re.compile(_NUMBER, re.ASCII)

_DECIMAL = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_BINARY = {"k": 1024.0, "m": 1024.0 ** 2, "g": 1024.0 ** 3}

KINDS = ("bitops", "size", "ratio")


@dataclass(frozen=True)
class Budget:
    """A parsed budget: ``kind`` is ``"bitops"``, ``"size"`` (bytes) or ``"ratio"`` (of the
    all-8-bit BitOPs); ``text`` is what the user wrote."""

    kind: str
    value: float
    text: str

    def describe(self) -> str:
        if self.kind == "bitops":
            return f"{format_bitops(self.value)} BitOPs"
        if self.kind == "size":
            return f"{format_bytes(self.value)}"
        return f"{self.value:g} x the all-8-bit BitOPs"


def _bad(text: str, why: str = "") -> UserError:
    extra = f" ({why})" if why else ""
    return UserError(f"budget: {text!r} is not a valid budget{extra}; {ACCEPTED}")


def _finite_positive(text: str, value: float) -> float:
    if not math.isfinite(value) or value <= 0:
        raise _bad(text, "it must be a finite number above 0")
    return value


def parse_budget(text, kind: Optional[str] = None) -> Budget:
    """Parse a budget string. ``kind`` (``"bitops"``, ``"size"``, ``"ratio"``) requires that kind,
    e.g. ``--budget-size`` passes ``"size"``; ``None`` accepts any of them."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} or None, got {kind!r}")
    if not isinstance(text, str):
        raise _bad(repr(text), "not a string")
    s = text
    if s != s.strip() or not s or " " in s:
        raise _bad(text, "empty or contains spaces" if s.strip() else "empty")
    parsed: Optional[Budget] = None
    m = _BITOPS_RE.fullmatch(s)
    if m:
        value = float(m.group("num")) * _DECIMAL[m.group("unit").lower()]
        parsed = Budget("bitops", _finite_positive(text, value), text)
    if parsed is None:
        m = _SIZE_RE.fullmatch(s)
        if m:
            unit = m.group("unit").lower()
            prefix, binary = unit[:-1].rstrip("i"), unit.endswith("ib")
            if binary and not prefix:
                raise _bad(text, "'iB' needs a prefix: KiB, MiB or GiB")
            scale = _BINARY[prefix] if binary else _DECIMAL[prefix]
            parsed = Budget("size", _finite_positive(text, float(m.group("num")) * scale), text)
    if parsed is None:
        m = _PLAIN_RE.fullmatch(s)
        if m:
            value = _finite_positive(text, float(m.group("num")))
            if kind == "ratio" or (kind is None and value <= 1.0):
                if value > 1.0:
                    raise _bad(text, "a ratio must lie in (0, 1]")
                parsed = Budget("ratio", value, text)
            else:
                parsed = Budget("size" if kind == "size" else "bitops", value, text)
    if parsed is None:
        if s.startswith("-") and (_PLAIN_RE.fullmatch(s[1:]) or _BITOPS_RE.fullmatch(s[1:])
                                  or _SIZE_RE.fullmatch(s[1:])):
            raise _bad(text, "negative: a budget must be above 0")
        if s.lower().lstrip("+-") in ("nan", "inf", "infinity"):
            raise _bad(text, "it must be a finite number above 0")
        raise _bad(text)
    if kind is not None and parsed.kind != kind:
        raise UserError(f"budget: {text!r} is a {parsed.kind} budget, but a {kind} budget is expected "
                        f"here; {ACCEPTED}")
    return parsed


def parse_budget_list(text: str) -> list:
    """``"34.7G,22.8G,14.4G"`` -> list of :class:`Budget` (any kind each)."""
    if not isinstance(text, str) or not text.strip():
        raise _bad(str(text), "empty list")
    return [parse_budget(part) for part in text.split(",")]


def format_bitops(value: float) -> str:
    """``22.85e9`` -> ``"22.85G"``."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.4g}{unit}"
    return f"{value:.4g}"


def format_bytes(value: float) -> str:
    """``2.5e6`` -> ``"2.5MB"`` (decimal units)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.4g}{unit}"
    return f"{value:.4g}B"


# ------------------------------------------------------------------------------------------- targets
@dataclass
class Target:
    """One budget to answer: all of its constraints must hold. ``max_bitops`` / ``max_size``
    (bytes) are the tightest of the given budgets of each kind (``None``: unconstrained);
    ``label`` names it in logs and in config.json."""

    label: str
    max_bitops: Optional[float] = None
    max_size: Optional[float] = None
    budgets: List[Budget] = field(default_factory=list)

    def add(self, b: Budget, cost) -> None:
        """Add the constraint ``b``; a ratio is resolved against ``cost.uniform8_bitops()``."""
        if b.kind == "size":
            self.max_size = b.value if self.max_size is None else min(self.max_size, b.value)
        else:
            value = b.value * cost.uniform8_bitops() if b.kind == "ratio" else b.value
            self.max_bitops = value if self.max_bitops is None else min(self.max_bitops, value)
        self.budgets.append(b)

    def fits(self, cost, config) -> bool:
        return ((self.max_bitops is None or cost.bitops(config) <= self.max_bitops)
                and (self.max_size is None or cost.size_bytes(config) <= self.max_size))

    def as_dict(self) -> Dict[str, Any]:
        return {"text": self.label, "bitops": self.max_bitops, "size_bytes": self.max_size,
                "given": [{"kind": b.kind, "value": b.value, "text": b.text} for b in self.budgets]}


def budget_targets(single: Sequence[Budget], listed: Sequence[Budget], cost) -> List[Target]:
    """The targets of the given budgets: each of ``listed`` (``--budgets``) alone, or ``single``
    (``--budget``, ``--budget-size``, ``--budget-ratio``) together as one; ``[]`` when none is given."""
    groups = [[b] for b in listed] if listed else ([list(single)] if single else [])
    targets = []
    for group in groups:
        t = Target(",".join(b.text for b in group))
        for b in group:
            t.add(b, cost)
        targets.append(t)
    return targets


def default_target(w3a3_bitops: Optional[float], min_bitops: float, max_bitops: float, cost) -> Target:
    """The target when no budget is given: the BitOPs of uniform W3A3 (``w3a3_bitops``; ``None``
    when 3 bits is not a candidate of every layer), else the geometric middle of the achievable
    BitOPs range."""
    if w3a3_bitops is not None:
        value = w3a3_bitops
        t = Target(f"W3A3 BitOPs ({format_bitops(value)})")
    else:
        value = math.sqrt(min_bitops * max_bitops)
        t = Target(f"default ({format_bitops(value)})")
    t.add(Budget("bitops", value, t.label), cost)
    return t


def check_reachable(targets: Sequence[Target], min_bitops: float, min_size: float, max_bitops: float,
                    max_size: float, warn: Callable[[str], None]) -> None:
    """Refuse (:class:`~mpq.errors.UserError`) a target below the lowest configuration's cost;
    ``warn`` about each target that the largest configuration already meets (the search then has
    nothing to trade). Targets are checked in order, each warned about before the next is checked."""
    for t in targets:
        if t.max_bitops is not None and t.max_bitops < min_bitops:
            raise UserError(f"budget {t.label!r} = {format_bitops(t.max_bitops)} BitOPs is below the "
                            f"minimum achievable {format_bitops(min_bitops)} BitOPs ({min_bitops:.6g}; "
                            f"every layer at its lowest bit-width)")
        if t.max_size is not None and t.max_size < min_size:
            raise UserError(f"budget {t.label!r} = {format_bytes(t.max_size)} is below the minimum "
                            f"achievable size {format_bytes(min_size)} ({min_size:.0f} bytes; every "
                            f"layer at its lowest weight bit-width)")
        if ((t.max_bitops is None or t.max_bitops >= max_bitops)
                and (t.max_size is None or t.max_size >= max_size)):
            warn(f"warning: budget {t.label!r} is at or above the largest configuration's cost "
                 f"({format_bitops(max_bitops)} BitOPs, {format_bytes(max_size)}); the largest "
                 f"configuration is returned")
