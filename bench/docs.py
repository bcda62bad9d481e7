"""docs/benchmarks.md is written by several tools, each owning a section between its own markers."""
from __future__ import annotations

from pathlib import Path


def put_section(doc: Path, start: str, end: str, block: str, first: bool = True) -> None:
    """Replace the text from `start` to `end` (markers included; `block` carries its own) with
    `block`; a new section goes after the title line (`first`) or at the end of the file."""
    text = doc.read_text() if doc.exists() else "# FA Pool benchmarks\n"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    elif first:
        head, _, rest = text.partition("\n")
        text = f"{head}\n\n{block}\n{rest}"
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(text)
