"""docs/state.md is the public schema of the shared state: its tables name every key the key
schema builds and every Lua script, each exactly once, and nothing else."""

from __future__ import annotations

import inspect
import re
from importlib import resources
from pathlib import Path

from shared_state.schema import KeySchema

STATE_MD = Path(__file__).resolve().parents[2] / "docs" / "state.md"
# Arguments that stand for the placeholders the documentation writes.
PLACEHOLDERS = {
    "node_id": "<id>",
    "digest": "<digest>",
    "pair": "<prefill-id> <decode-id>",
    "model": "<model>",
    "role": "<role>",
    "priority": "<priority>",
}


def table_rows(heading: str) -> list[str]:
    """The first cell of every row of the first table after a line that starts ``heading``."""
    lines = STATE_MD.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    rows: list[str] = []
    for line in lines[start + 1 :]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        first = re.split(r"(?<!\\)\|", line)[1].strip()  # a cell may hold an escaped pipe
        if first and not set(first) <= {"-"}:
            rows.append(first)
    return rows


def schema_keys() -> list[str]:
    """Every key the schema builds, written as the documentation writes it (prefix ``P``)."""
    schema = KeySchema("P")
    keys: list[str] = []
    for name, member in inspect.getmembers(KeySchema):
        if name.startswith("_") or name in {"tag", "node_keys", "queue_keys", "admit_channel"}:
            continue
        if isinstance(member, property):
            keys.append(getattr(schema, name))
        elif inspect.isfunction(member):
            params = list(inspect.signature(member).parameters)[1:]
            keys.append(getattr(schema, name)(*(PLACEHOLDERS[p] for p in params)))
    return [
        k.replace("{P}", "P").replace("<prefill-id>|<decode-id>", r"<prefill-id>\|<decode-id>")
        for k in keys
    ]


def test_every_key_of_the_schema_is_documented_once() -> None:
    documented = [cell.strip("`") for cell in table_rows("| key | type |") if cell]
    built = schema_keys()
    assert len(built) > 10
    assert sorted(documented) == sorted(built)
    assert len(set(documented)) == len(documented)


def test_every_lua_script_is_documented_once() -> None:
    files = sorted(
        entry.name
        for entry in resources.files("shared_state.lua").iterdir()
        if entry.name.endswith(".lua") and not entry.name.startswith("_")
    )
    documented = [cell.strip("`") for cell in table_rows("| script |")]
    assert sorted(documented) == files
    assert len(set(documented)) == len(documented)
