"""The one exception type for mistakes a user can make.

Every error a user can cause (a bad flag, a missing file, a malformed JSONL line)
is raised as `GptkitError` with one sentence naming what was wrong and what was
expected. The CLI prints that sentence and exits with status 2; the server turns
it into a 400. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any


class GptkitError(ValueError):
    """A user-facing error: its message is one clear sentence."""


def closest(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """A ' (did you mean X?)' hint for a misspelt name, or ''."""
    match = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean '{match[0]}'?)" if match else ""


def read_json(path: Path) -> Any:
    """The JSON in a file a user supplied (config, meta, task, tokenizer files); a file that
    is not UTF-8 JSON is one sentence naming it, like every other user mistake."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GptkitError(f"{path} is not valid JSON ({exc}).") from None
