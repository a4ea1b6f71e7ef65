"""Module-name pattern lists in quantization configs ("re:<regex>" entries are regular expressions)."""
from __future__ import annotations

import re


def check_regex_entries(entries: list[str], key: str, source: str) -> None:
    """ValueError naming `source` and `key` for the first "re:" entry that does not compile."""
    for entry in entries:
        if entry.startswith("re:"):
            try:
                re.compile(entry[3:])
            except re.error as exc:
                raise ValueError(f"{source}: {key} entry {entry!r} is not a valid regex: {exc}") from exc
