"""Errors that point at the user's own line: ``file:line:col``, an excerpt, a caret, the fix."""

from __future__ import annotations

import linecache


class DSLError(Exception):
    """A mistake in a user's mod or spec.

    ``str(err)`` reads::

        my_mods.py:12:11: Python `if` on a traced value
            if q_idx >= kv_idx:
               ^
        fix: use torch.where(cond, a, b) or combine masks with & | ~
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        col: int | None = None,
        source_line: str | None = None,
        fix: str | None = None,
        end_col: int | None = None,
    ):
        self.message = message
        self.file = file
        self.line = line
        self.col = col
        self.fix = fix
        if source_line is None and file and line:
            source_line = linecache.getline(file, line).rstrip("\n") or None
        self.source_line = source_line
        self.end_col = end_col
        super().__init__(self._render())

    def _render(self) -> str:
        where = ""
        if self.file is not None:
            where = f"{self.file}:{self.line if self.line is not None else '?'}"
            if self.col is not None:
                where += f":{self.col}"
            where += ": "
        out = [where + self.message]
        if self.source_line:
            text = self.source_line.rstrip()
            stripped = text.lstrip()
            indent = len(text) - len(stripped)
            out.append("    " + stripped)
            if self.col is not None and self.col >= 1:
                caret_at = max(self.col - 1 - indent, 0)
                width = 1
                if self.end_col is not None and self.end_col > self.col:
                    width = self.end_col - self.col
                out.append("    " + " " * caret_at + "^" * width)
        if self.fix:
            out.append(f"fix: {self.fix}")
        return "\n".join(out)
