"""A readable terminal table: rich when it is importable, else plain aligned columns."""
from __future__ import annotations

import sys
from typing import TextIO


def render_plain(headers: list[str], rows: list[list[str]], title: str = "") -> str:
    """Columns padded to their widest cell; numbers right-aligned, text left-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        out = []
        for cell, w in zip(cells, widths):
            out.append(cell.rjust(w) if _numeric(cell) else cell.ljust(w))
        return "  ".join(out).rstrip()

    parts = [title] if title else []
    parts += [line(headers), "  ".join("-" * w for w in widths)]
    parts += [line(r) for r in rows]
    return "\n".join(parts)


def _numeric(cell: str) -> bool:
    core = cell.lstrip("-").replace(",", "").replace(".", "", 1).rstrip("%x")
    return core.isdigit()


def print_table(headers: list[str], rows: list[list[str]], title: str = "", file: TextIO | None = None,
                plain: bool = False) -> None:
    file = file or sys.stdout
    if not plain:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            plain = True
    if plain:
        print(render_plain(headers, rows, title), file=file, flush=True)
        return
    table = Table(title=title or None)
    for h in headers:
        table.add_column(h, overflow="fold", min_width=30 if h == "status" else None)
    for r in rows:
        table.add_row(*r)
    tty = hasattr(file, "isatty") and file.isatty()
    Console(file=file, width=None if tty else 240).print(table)  # logs: wide enough that rows stay one line
