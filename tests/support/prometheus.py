"""Reading what Prometheus reads: the samples and metric families of a text page, the metric
names a PromQL expression queries, and the expressions of a Grafana dashboard."""

from __future__ import annotations

import json
import re
from pathlib import Path

Sample = tuple[str, frozenset[tuple[str, str]]]
"""A sample's name and its labels."""

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
_HISTOGRAM_PARTS = ("_bucket", "_sum", "_count")


def samples(text: str) -> dict[Sample, float]:
    """Every sample of a Prometheus text page by name and labels; a malformed line fails."""
    found: dict[Sample, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a Prometheus sample line: {line!r}"
        labels = frozenset(_LABEL.findall(match.group(3) or ""))
        key = (match.group(1), labels)
        assert key not in found, f"sample twice: {line!r}"
        found[key] = float(match.group(4))
    return found


def families(text: str) -> dict[str, str]:
    """Each metric family's name and type (``# TYPE`` lines)."""
    kinds: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            kinds[name] = kind
    return kinds


def family_of(sample_name: str, kinds: dict[str, str]) -> str | None:
    """The family a sample (or a queried name) belongs to: a histogram's ``_bucket``, ``_sum``
    and ``_count`` belong to the histogram."""
    if sample_name in kinds:
        return sample_name
    for suffix in _HISTOGRAM_PARTS:
        base = sample_name.removesuffix(suffix)
        if base != sample_name and kinds.get(base) == "histogram":
            return base
    return None


def total(found: dict[Sample, float], name: str) -> float:
    """The sum of every series of ``name``."""
    return sum(value for (sample, _), value in found.items() if sample == name)


# -- PromQL ---------------------------------------------------------------------------------

# Words of the language that look like names: operators, modifiers and aggregation clauses.
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
    | {"group_left", "group_right", "inf", "nan", "atan2"}
)
# Clauses whose parentheses hold label names, not expressions.
_LABEL_LISTS = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (Grafana's ``$variables`` allowed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # string literals
    text = re.sub(r"\$\{?\w+\}?", "1m", text)  # Grafana variables ($__rate_interval, ...)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges and subqueries
    text = _LABEL_LISTS.sub("", text)
    names = set()
    for match in _NAME.finditer(text):
        word = match.group(0)
        before = text[match.start() - 1] if match.start() else " "
        after = text[match.end() :].lstrip()[:1]
        if before.isdigit() or before == ".":  # a number's tail: 1e3, 0.5, 5m
            continue
        if after == "(" or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


# Grafana's variables as a query sent to Prometheus has them (the dashboard's $replica: all).
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "1h", "$__interval": "15s"}


def dashboard_expressions(path: Path, variables: dict[str, str] | None = None) -> list[str]:
    """Every PromQL expression of a Grafana dashboard: its panels' targets and its variables'
    ``label_values(metric, label)`` (as the metric), with ``variables`` substituted."""
    dashboard = json.loads(path.read_text())
    found = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
    for variable in dashboard["templating"]["list"]:
        found.append(re.sub(r"label_values\((\w+), \w+\)", r"\1", variable["definition"]))
    for name, value in (variables or {}).items():
        found = [expr.replace(name, value) for expr in found]
    return found
