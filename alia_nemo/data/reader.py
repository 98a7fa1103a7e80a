"""One reader for every local data file: JSONL and Parquet rows, with one policy for bad input.

The mixture, ``data=jsonl`` and the CPT corpus all read local files through :func:`iter_jsonl` and
:func:`read_local_rows`:

- a line that is not valid UTF-8, not valid JSON, or not a JSON object is an :class:`InvalidRow` (the
  caller drops and counts it under its reason: "invalid UTF-8", "invalid JSON", "not a JSON object");
- a UTF-8 byte order mark is stripped (the row after it is kept);
- a file that is not UTF-8 text at all (compressed, UTF-16/32, Parquet or Arrow named .jsonl), and a
  Parquet file that can not be read, raise the caller's error class naming the file and the fix.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from alia_nemo.errors import AliaError


class DataError(AliaError, ValueError):
    """A data file or row that can not be used; names the file, the row and the fix."""


@dataclass(frozen=True)
class InvalidRow:
    """A line of a local file that is not a row: why (a short, stable reason, counted) and where (file:line)."""

    reason: str
    where: str


# Signatures of files that are not UTF-8 text: reading them line by line would only count garbage.
_NOT_TEXT = (
    (b"\x1f\x8b", "gzip-compressed", "decompress it (gunzip)"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed", "decompress it (zstd -d)"),
    (b"\xfd7zXZ\x00", "xz-compressed", "decompress it (xz -d)"),
    (b"PK\x03\x04", "zip archive", "extract it"),
    (b"PAR1", "Parquet", "give it the .parquet extension"),
    (b"ARROW1", "Arrow", "give it the .arrow extension (CPT corpora) or convert it to .parquet"),
    (codecs.BOM_UTF32_LE, "UTF-32", "convert it to UTF-8 (iconv -f UTF-32 -t UTF-8)"),
    (codecs.BOM_UTF32_BE, "UTF-32", "convert it to UTF-8 (iconv -f UTF-32 -t UTF-8)"),
    (codecs.BOM_UTF16_LE, "UTF-16", "convert it to UTF-8 (iconv -f UTF-16 -t UTF-8)"),
    (codecs.BOM_UTF16_BE, "UTF-16", "convert it to UTF-8 (iconv -f UTF-16 -t UTF-8)"),
)
_BZIP2 = re.compile(rb"BZh[1-9]1AY&SY")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _check_text_file(path: str, head: bytes, error: type[AliaError]) -> None:
    """Raise ``error`` when ``head`` (a file's first bytes) shows that it is not UTF-8 JSONL at all."""
    for magic, kind, fix in _NOT_TEXT:
        if head.startswith(magic):
            raise error(f"{path}: not UTF-8 JSON lines: it looks like a {kind} file; {fix}, or list another file")
    if _BZIP2.match(head):
        raise error(f"{path}: not UTF-8 JSON lines: it looks like a bzip2-compressed file; decompress it (bunzip2)")


def _parse_line(raw: bytes, where: str) -> dict | InvalidRow | None:
    """One JSONL line: its object, an :class:`InvalidRow`, or None for a blank line."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return InvalidRow("invalid UTF-8", where)
    if line.startswith("\ufeff"):  # a byte order mark (an editor's, or files joined with cat): not data
        line = line[1:]
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):  # JSONDecodeError, an over-long integer, absurd nesting
        return InvalidRow("invalid JSON", where)
    if not isinstance(row, dict):
        return InvalidRow("not a JSON object", where)
    if _SURROGATE_ESCAPE.search(line):
        # A "\ud800"-style escape without its pair decodes to a string that can not be written as UTF-8.
        try:
            json.dumps(row, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return InvalidRow("invalid Unicode (unpaired surrogate escape)", where)
    return row


def iter_jsonl(path: str, error: type[AliaError] = DataError) -> Iterator[tuple[int, dict | InvalidRow]]:
    """``(line number, row)`` for each non-blank line of a JSONL file, streamed; see the module's bad-input policy.

    A bad line comes as an :class:`InvalidRow` (the caller counts or refuses it); a file that is not UTF-8
    text raises ``error`` (default :class:`DataError`) naming the file and the fix.
    """
    name = Path(path).name
    with open(path, "rb") as f:
        _check_text_file(path, f.read(16), error)
        f.seek(0)
        for lineno, raw in enumerate(f, 1):
            row = _parse_line(raw, f"{name}:{lineno}")
            if row is not None:
                yield lineno, row


def _parquet_rows(path: str, error: type[AliaError]) -> Iterator[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=2048):
            yield from batch.to_pylist()
    except pa.ArrowException as exc:  # not Parquet, truncated, or a corrupt page
        why = " ".join(str(exc).split())[:300]
        raise error(
            f"{path}: not a readable Parquet file ({type(exc).__name__}: {why}); re-export or re-download it, "
            "or remove it from the configured files"
        ) from None


def read_local_rows(files: list[str], error: type[AliaError] = DataError) -> Iterator[dict | InvalidRow]:
    """Rows of local Parquet / JSONL files, streamed; a bad JSONL line comes as an :class:`InvalidRow`.

    ``error`` is the class raised for a file that can not be read at all (default :class:`DataError`).
    """
    for file in files:
        if file.endswith(".parquet"):
            yield from _parquet_rows(file, error)
        else:
            for _, row in iter_jsonl(file, error):
                yield row
