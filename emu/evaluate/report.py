"""Evaluation outputs: KFP metric values, the metrics JSON, and Markdown / HTML reports.

- `kfp_metrics(result)` flattens a scoring result into `{name: float}` with names every KFP
  version accepts (lower-case letters, digits and "_", starting with a letter, at most 64
  characters: KFP v1's `mlpipeline-metrics` rule; v2's `Metrics.log_metric` takes any string) and
  only finite numbers (metric metadata is JSON, which has no NaN).
- `write_metrics_json(path, ...)` writes the full result plus those flat metrics, atomically, and
  never replaces an existing file unless told to.
- `write_markdown_report` / `write_html_report` render sections of text, tables and images. HTML
  embeds images as base64 `<img>` tags (one self-contained file); Markdown references image files,
  copied into `<report stem>_files/` next to the report unless they already sit under its folder.
"""

from __future__ import annotations

import base64
import html
import json
import math
import numbers
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emu.errors import EmuError

__all__ = ["Figure", "Section", "Table", "kfp_metrics", "metric_name", "write_html_report",
           "write_markdown_report", "write_metrics_json"]

#: Result keys that hold per-item detail or id lists, not metrics.
DETAIL_KEYS = frozenset({"per_question", "per_image", "missing_question_ids", "missing_image_ids"})
_MAX_NAME = 64
_NON_NAME = re.compile(r"[^a-z0-9]+")


def metric_name(*parts: str) -> str:
    """A KFP-safe metric name from name parts: "VQAv2", "per_answer_type", "yes/no" ->
    "vqav2_per_answer_type_yes_no"."""
    name = _NON_NAME.sub("_", "_".join(str(p) for p in parts if str(p)).lower()).strip("_")
    if not name:
        raise EmuError(f"metric name from {parts!r} is empty")
    if not name[0].isalpha():
        name = "m_" + name
    if len(name) > _MAX_NAME:
        import hashlib
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = name[:_MAX_NAME - 9].rstrip("_") + "_" + digest
    return name


def kfp_metrics(result: Mapping[str, Any], prefix: str = "", *,
                exclude: Iterable[str] = DETAIL_KEYS) -> dict[str, float]:
    """Numeric leaves of `result` (nested mappings flattened) as `{kfp_name: float}`. Strings,
    lists and the `exclude` keys are skipped; booleans are not metrics; a NaN or infinite value or
    two leaves that map to the same name are errors."""
    skip = set(exclude)
    out: dict[str, float] = {}
    origin: dict[str, str] = {}

    def visit(node: Mapping[str, Any], path: list[str]) -> None:
        for key, value in node.items():
            if key in skip:
                continue
            here = path + [str(key)]
            if isinstance(value, Mapping):
                visit(value, here)
            elif isinstance(value, numbers.Real) and not isinstance(value, bool):  # numpy scalars too
                name = metric_name(*([prefix] if prefix else []), *here)
                dotted = ".".join(here)
                if name in out:
                    raise EmuError(f"metrics {origin[name]!r} and {dotted!r} both map to the KFP name {name!r}")
                if not math.isfinite(value):
                    raise EmuError(f"metric {dotted!r} is not finite ({value}); KFP metrics must be numbers")
                out[name] = float(value)
                origin[name] = dotted

    visit(result, [])
    return out


def _atomic_write(path: Path, text: str, overwrite: bool) -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise EmuError(f"{path} already exists; pass overwrite (--force) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_metrics_json(path: str | Path, result: Mapping[str, Any], *, prefix: str = "",
                       inputs: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write `{"metrics": kfp_metrics(result, prefix), "result": result, "inputs": inputs}` as
    indented JSON (atomically: a reader never sees half a file). Refuses to replace an existing
    file unless `overwrite`."""
    payload = {"metrics": kfp_metrics(result, prefix), "result": result}
    if inputs is not None:
        payload["inputs"] = dict(inputs)
    return _atomic_write(Path(path), json.dumps(payload, indent=2, ensure_ascii=False) + "\n", overwrite)


# ----------------------------------------------------------------------------------------------
# Reports


@dataclass
class Table:
    """Rows of cells; floats are printed with `precision` decimals, everything else with str()."""

    columns: Sequence[str]
    rows: Sequence[Sequence[Any]]
    caption: str = ""
    precision: int = 4

    def __post_init__(self) -> None:
        for i, row in enumerate(self.rows):
            if len(row) != len(self.columns):
                raise EmuError(f"table row {i} has {len(row)} cells for {len(self.columns)} columns")

    def cell(self, value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.{self.precision}f}"
        return "" if value is None else str(value)


@dataclass
class Figure:
    """An image: a file path, encoded bytes (PNG/JPEG/GIF/WebP), or a PIL image (saved as PNG)."""

    image: Any
    caption: str = ""


@dataclass
class Section:
    heading: str
    text: str = ""
    tables: Sequence[Table] = field(default_factory=list)
    figures: Sequence[Figure] = field(default_factory=list)


_MAGIC = ((b"\x89PNG\r\n\x1a\n", "png", "image/png"), (b"\xff\xd8\xff", "jpg", "image/jpeg"),
          (b"GIF87a", "gif", "image/gif"), (b"GIF89a", "gif", "image/gif"))


def _image_bytes(image: Any) -> tuple[bytes, str, str]:
    """(bytes, extension, MIME type) of a figure's image."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise EmuError(f"report image {path} does not exist")
        data = path.read_bytes()
    elif isinstance(image, (bytes, bytearray)):
        data = bytes(image)
    elif hasattr(image, "save"):  # PIL.Image.Image
        import io
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
    else:
        raise EmuError(f"report image must be a path, bytes or a PIL image, got {type(image).__name__}")
    for magic, ext, mime in _MAGIC:
        if data.startswith(magic):
            return data, ext, mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return data, "webp", "image/webp"
    raise EmuError("report image is not PNG, JPEG, GIF or WebP")


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_markdown_report(path: str | Path, title: str, sections: Sequence[Section], *,
                          overwrite: bool = False) -> Path:
    """A Markdown report. Images are files referenced relative to the report: a path already
    under the report's folder is linked in place, anything else is written to
    `<stem>_files/figure_<n>.<ext>`. Beside it, `<stem>.json` holds the same sections as data
    (tables as cell strings, figures as relative file paths) for programs such as the dashboard."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise EmuError(f"{path} already exists; pass overwrite (--force) to replace it")
    root = path.parent.resolve()
    assets = path.parent / f"{path.stem}_files"
    lines = [f"# {title}", ""]
    index: dict[str, Any] = {"title": title, "sections": []}
    figure_no = 0
    for section in sections:
        entry: dict[str, Any] = {"heading": section.heading, "text": section.text, "tables": [], "figures": []}
        index["sections"].append(entry)
        lines += [f"## {section.heading}", ""]
        if section.text:
            lines += [section.text, ""]
        for table in section.tables:
            if table.caption:
                lines += [f"*{table.caption}*", ""]
            lines.append("| " + " | ".join(_md_escape(str(c)) for c in table.columns) + " |")
            lines.append("|" + "|".join(" --- " for _ in table.columns) + "|")
            lines += ["| " + " | ".join(_md_escape(table.cell(v)) for v in row) + " |" for row in table.rows]
            lines.append("")
            entry["tables"].append({"caption": table.caption, "columns": [str(c) for c in table.columns],
                                    "rows": [[table.cell(v) for v in row] for row in table.rows]})
        for figure in section.figures:
            figure_no += 1
            target = None
            if isinstance(figure.image, (str, Path)) and Path(figure.image).is_file():
                resolved = Path(figure.image).resolve()
                if resolved.is_relative_to(root):
                    _image_bytes(resolved)  # still check it is an image
                    target = resolved
            if target is None:
                data, ext, _ = _image_bytes(figure.image)
                assets.mkdir(parents=True, exist_ok=True)
                target = (assets / f"figure_{figure_no}.{ext}").resolve()
                target.write_bytes(data)
            alt = _md_escape(figure.caption or f"figure {figure_no}").replace("]", "\\]")
            lines += [f"![{alt}]({target.relative_to(root).as_posix()})", ""]
            if figure.caption:
                lines += [f"*{figure.caption}*", ""]
            entry["figures"].append({"file": target.relative_to(root).as_posix(), "caption": figure.caption})
    _atomic_write(path.with_suffix(".json"), json.dumps(index, indent=1, ensure_ascii=False) + "\n", overwrite=True)
    return _atomic_write(path, "\n".join(lines).rstrip() + "\n", overwrite=True)


def write_html_report(path: str | Path, title: str, sections: Sequence[Section], *,
                      overwrite: bool = False) -> Path:
    """A single self-contained HTML file: text escaped, tables as <table>, images inline as
    base64 data URIs."""
    esc = html.escape
    parts = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\">", f"<title>{esc(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}"
             "figure{display:inline-block;margin:0.5em}img{max-width:512px}</style></head><body>",
             f"<h1>{esc(title)}</h1>"]
    for section in sections:
        parts.append(f"<h2>{esc(section.heading)}</h2>")
        if section.text:
            parts += [f"<p>{esc(p)}</p>" for p in section.text.split("\n\n")]
        for table in section.tables:
            parts.append("<table>")
            if table.caption:
                parts.append(f"<caption>{esc(table.caption)}</caption>")
            parts.append("<tr>" + "".join(f"<th>{esc(str(c))}</th>" for c in table.columns) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{esc(table.cell(v))}</td>" for v in row) + "</tr>" for row in table.rows]
            parts.append("</table>")
        for figure in section.figures:
            data, _, mime = _image_bytes(figure.image)
            encoded = base64.b64encode(data).decode("ascii")
            caption = f"<figcaption>{esc(figure.caption)}</figcaption>" if figure.caption else ""
            parts.append(f"<figure><img src=\"data:{mime};base64,{encoded}\" alt=\"{esc(figure.caption)}\">{caption}</figure>")
    parts.append("</body></html>")
    return _atomic_write(Path(path), "\n".join(parts) + "\n", overwrite)

