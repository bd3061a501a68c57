"""One report, two renderings: a self-contained HTML page (figures embedded as base64 PNG, inline
CSS, no scripts, nothing fetched) and a Markdown file with the same sections and tables.

    rep = Report("mixq bench — tiny")
    rep.heading("Results")
    rep.paragraph("KL is measured against the unquantized model.")
    rep.table(["method", "bpw", "KL"], [["rtn", 3.0, 0.12]], caption="PTB test, 4096 tokens")
    rep.figure(pareto_plot, points, y="kl", caption="KL vs bpw")   # any plot function taking (..., out)
    rep.write("out/report.html", "out/report.md")

Paragraph text takes two inline marks in both renderings: ```code``` and ``**bold**``.  A figure
whose plot function raises is replaced by a note saying why, so one bad input never loses the
rest of a report.
"""
from __future__ import annotations

import base64
import html
import logging
import math
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import write_bytes_atomic

log = logging.getLogger(__name__)

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #bbb; margin-top: 2em; }
table { border-collapse: collapse; margin: .6em 0; font-size: 0.86em; }
th, td { border: 1px solid #ccc; padding: 3px 7px; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
caption, .protocol { caption-side: bottom; text-align: left; font-size: 0.8em; color: #555; padding-top: .3em; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #444; }
.note { background: #fff6d5; border-left: 4px solid #e0b000; padding: .4em .8em; }
.missing { background: #f4f4f4; border-left: 4px solid #999; padding: .4em .8em; color: #555; }
code { background: #f3f3f3; padding: 0 .2em; }
nav ul { columns: 2; font-size: 0.9em; }
"""


# ---------------------------------------------------------------------------- formatting
def fmt(v, digits: int = 4) -> str:
    """A table cell: ``None`` → ``—``, floats to ``digits`` significant digits (plain notation
    between 1e-3 and 1e6), ints and strings unchanged, ``[lo, hi]`` pairs as ``[lo, hi]``."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if v == 0:
            return "0"
        if 1e-3 <= abs(v) < 1e6:
            s = f"{v:.{digits}g}"
            return s if "e" not in s else f"{v:.{max(digits - 4, 0)}f}"
        return f"{v:.{max(digits - 1, 1)}e}"
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v):
        return f"[{fmt(float(v[0]), digits)}, {fmt(float(v[1]), digits)}]"
    return str(v)


def _numeric(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def inline_html(text: str) -> str:
    """Escape ``text`` and render its ```code``` and ``**bold**`` marks."""
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", out)


def _md_cell(v) -> str:
    return fmt(v).replace("|", "\\|").replace("\n", " ")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


def png_of(plot: Callable, *args, **kwargs) -> bytes:
    """Run ``plot(*args, out=<temp .png>, **kwargs)`` (the signature of :mod:`mixq.report.plots`)
    and return the PNG's bytes."""
    with tempfile.TemporaryDirectory(prefix="mixq-fig-") as d:
        path = Path(d) / "figure.png"
        written = plot(*args, out=path, **kwargs)
        return Path(written or path).read_bytes()


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, replacing it (:func:`mixq.atomic.write_bytes_atomic`)."""
    return write_bytes_atomic(path, text.encode("utf-8"), overwrite=True)


# ---------------------------------------------------------------------------- the report
@dataclass
class _Block:
    kind: str  # heading | paragraph | note | missing | table | figure | protocol
    data: dict = field(default_factory=dict)


class Report:
    """Sections of headings, paragraphs, tables and figures, rendered as HTML and Markdown."""

    def __init__(self, title: str, subtitle: str | None = None):
        self.title, self.subtitle = title, subtitle
        self.blocks: list[_Block] = []
        self._figures = 0

    # -------------------------------------------------------------- building
    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(_Block("heading", {"text": text, "level": level, "id": self._unique_id(slug(text))}))

    def paragraph(self, text: str) -> None:
        self.blocks.append(_Block("paragraph", {"text": text}))

    def note(self, text: str) -> None:
        """A highlighted warning (e.g. calibration/evaluation overlap, partial results)."""
        self.blocks.append(_Block("note", {"text": text}))

    def missing(self, text: str) -> None:
        """What is not there (a benchmark that was not run)."""
        self.blocks.append(_Block("missing", {"text": text}))

    def protocol(self, text: str) -> None:
        """The small print under a table or figure: how its numbers were measured."""
        self.blocks.append(_Block("protocol", {"text": text}))

    def table(self, headers: Sequence[str], rows: Sequence[Sequence], *, caption: str | None = None) -> None:
        self.blocks.append(_Block("table", {"headers": list(headers), "rows": [list(r) for r in rows],
                                            "caption": caption}))

    def figure(self, plot: Callable, *args, caption: str, name: str | None = None, **kwargs) -> bool:
        """Draw ``plot(*args, out=..., **kwargs)`` and embed it; on failure add a note instead.
        Returns whether the figure was drawn."""
        self._figures += 1
        name = name or f"figure-{self._figures}"
        try:
            png = png_of(plot, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - a figure never takes the report down
            log.warning("figure %s not drawn: %s", name, e)
            self.missing(f"Figure not drawn ({caption}): {type(e).__name__}: {e}")
            return False
        self.blocks.append(_Block("figure", {"png": png, "caption": caption, "name": slug(name)}))
        return True

    def _unique_id(self, base: str) -> str:
        used = {b.data.get("id") for b in self.blocks}
        out, k = base, 2
        while out in used:
            out, k = f"{base}-{k}", k + 1
        return out

    # -------------------------------------------------------------- rendering
    def html(self) -> str:
        heads = [b for b in self.blocks if b.kind == "heading" and b.data["level"] == 2]
        parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
                 f"<title>{html.escape(self.title)}</title>", f"<style>{CSS}</style></head><body>",
                 f"<h1>{html.escape(self.title)}</h1>"]
        if self.subtitle:
            parts.append(f"<p>{inline_html(self.subtitle)}</p>")
        if len(heads) > 2:
            parts.append("<nav><ul>" + "".join(f'<li><a href="#{b.data["id"]}">{html.escape(b.data["text"])}</a></li>'
                                               for b in heads) + "</ul></nav>")
        for b in self.blocks:
            d = b.data
            if b.kind == "heading":
                lv = min(max(d["level"], 2), 4)
                parts.append(f'<h{lv} id="{d["id"]}">{html.escape(d["text"])}</h{lv}>')
            elif b.kind == "paragraph":
                parts.append(f"<p>{inline_html(d['text'])}</p>")
            elif b.kind in ("note", "missing"):
                parts.append(f'<p class="{b.kind}">{inline_html(d["text"])}</p>')
            elif b.kind == "protocol":
                parts.append(f'<p class="protocol">{inline_html(d["text"])}</p>')
            elif b.kind == "table":
                parts.append(_html_table(d["headers"], d["rows"], d["caption"]))
            elif b.kind == "figure":
                data = base64.b64encode(d["png"]).decode("ascii")
                cap = inline_html(d["caption"])
                parts.append(f'<figure><img alt="{html.escape(d["caption"])}" src="data:image/png;base64,{data}">'
                             f"<figcaption>{cap}</figcaption></figure>")
        parts.append("</body></html>")
        return "\n".join(parts) + "\n"

    def markdown(self, figure_dir: str | Path | None = None, relative_to: str | Path | None = None) -> str:
        """Markdown rendering.  ``figure_dir``: write each figure there as PNG and link it (paths
        relative to ``relative_to``, the Markdown file's folder); without it a figure is a line
        pointing at the HTML report."""
        lines = [f"# {self.title}", ""]
        if self.subtitle:
            lines += [self.subtitle, ""]
        for b in self.blocks:
            d = b.data
            if b.kind == "heading":
                lines += ["#" * min(max(d["level"], 2), 4) + " " + d["text"], ""]
            elif b.kind == "paragraph":
                lines += [d["text"], ""]
            elif b.kind == "note":
                lines += [f"> **Note.** {d['text']}", ""]
            elif b.kind == "missing":
                lines += [f"> {d['text']}", ""]
            elif b.kind == "protocol":
                lines += [f"<sub>{d['text']}</sub>", ""]
            elif b.kind == "table":
                lines += _md_table(d["headers"], d["rows"])
                if d["caption"]:
                    lines.append(f"<sub>{d['caption']}</sub>")
                lines.append("")
            elif b.kind == "figure":
                if figure_dir is None:
                    lines += [f"*Figure: {d['caption']} (embedded in the HTML report).*", ""]
                else:
                    fd = Path(figure_dir)
                    fd.mkdir(parents=True, exist_ok=True)
                    p = fd / f"{d['name']}.png"
                    p.write_bytes(d["png"])
                    rel = p.relative_to(relative_to) if relative_to is not None else p
                    lines += [f"![{d['caption']}]({rel.as_posix()})", "", f"*{d['caption']}*", ""]
        return "\n".join(lines).rstrip() + "\n"

    def write(self, html_path: str | Path, md_path: str | Path | None = None, *,
              figure_dir: str | Path | None = None) -> list[Path]:
        """Write the HTML (and Markdown) atomically; returns the paths written."""
        out = [write_text_atomic(html_path, self.html())]
        if md_path is not None:
            md_path = Path(md_path)
            out.append(write_text_atomic(md_path, self.markdown(figure_dir, relative_to=md_path.parent)))
        return out


def _html_table(headers, rows, caption) -> str:
    h = "".join(f"<th>{html.escape(str(x))}</th>" for x in headers)
    body = []
    for r in rows:
        cells = "".join(f'<td class="num">{html.escape(fmt(v))}</td>' if _numeric(v)
                        else f"<td>{inline_html(fmt(v))}</td>" for v in r)
        body.append(f"<tr>{cells}</tr>")
    cap = f"<caption>{inline_html(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{h}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _md_table(headers, rows) -> list[str]:
    align = ["---:" if rows and all(_numeric(r[i]) or r[i] is None for r in rows) else "---"
             for i in range(len(headers))]
    out = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "|".join(align) + "|"]
    out += ["| " + " | ".join(_md_cell(v) for v in r) + " |" for r in rows]
    return out


def generic_rows(rows: Sequence[dict], *, max_columns: int = 14) -> tuple[list[str], list[list]]:
    """Headers and cells for a list of result dicts of unknown shape: the scalar keys, in the
    order first seen, at most ``max_columns`` of them."""
    keys: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k not in keys and (v is None or isinstance(v, (str, int, float, bool))):
                keys.append(k)
    keys = keys[:max_columns]
    return keys, [[r.get(k) for k in keys] for r in rows]
