"""One renderer for every report the product writes (job reports, nightly history, policy
evaluation): a document of headings, paragraphs, tables and plots, written as report.md, a
self-contained report.html (plots embedded as base64 PNG) and the plots as PNG files."""

from __future__ import annotations

import base64
import html
import io
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FIGSIZE = (6.4, 4.0)
DPI = 100                          # PNGs are 640 x 400 pixels


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if math.isinf(v):
            return "inf"
        if v != 0 and abs(v) < 1e-2:
            return f"{v:.3g}"
        return f"{v:,.0f}" if abs(v) >= 1e5 else f"{v:.4g}" if abs(v) >= 100 else f"{v:.3f}"
    return str(v)


class Doc:
    def __init__(self, title: str):
        self.title = title
        self.blocks: list[tuple] = []
        self.images: dict[str, bytes] = {}

    def h2(self, text: str):
        self.blocks.append(("h2", text))

    def p(self, text: str):
        self.blocks.append(("p", text))

    def table(self, cols: list[str], rows: list, empty: str = "none"):
        self.blocks.append(("table", list(cols), [list(r) for r in rows], empty))

    def frame(self, frame, cols: list[str] | None = None, empty: str = "none"):
        """A table from a polars DataFrame's columns `cols` (all by default)."""
        cols = cols or list(frame.columns)
        self.table(cols, frame.select(cols).rows(), empty)

    def image(self, name: str, png: bytes, alt: str):
        self.images[name] = png
        self.blocks.append(("img", name, alt))

    def markdown(self) -> str:
        out = [f"# {self.title}"]
        for b in self.blocks:
            if b[0] == "h2":
                out.append(f"## {b[1]}")
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "table":
                _, cols, rows, empty = b
                if not rows:
                    out.append(f"_{empty}_")
                    continue
                lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
                out.append("\n".join(lines))
            elif b[0] == "img":
                out.append(f"![{b[2]}]({b[1]})")
        return "\n\n".join(out) + "\n"

    def html(self) -> str:
        def inline(text):
            text = html.escape(text)
            text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
            return re.sub(r"`(.+?)`", r"<code>\1</code>", text)

        body = [f"<h1>{html.escape(self.title)}</h1>"]
        for b in self.blocks:
            if b[0] == "h2":
                body.append(f"<h2>{html.escape(b[1])}</h2>")
            elif b[0] == "p":
                body.append(f"<p>{inline(b[1])}</p>")
            elif b[0] == "table":
                _, cols, rows, empty = b
                if not rows:
                    body.append(f"<p><i>{html.escape(empty)}</i></p>")
                    continue
                head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
                trs = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(v))}</td>" for v in r) + "</tr>"
                              for r in rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>")
            elif b[0] == "img":
                data = base64.b64encode(self.images[b[1]]).decode()
                body.append(f'<figure><img alt="{html.escape(b[2])}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{html.escape(b[2])}</figcaption></figure>")
        style = ("body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
                 "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
                 "padding:.25em .6em;text-align:right}th{background:#f4f4f4}img{max-width:100%}")
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}"
                f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n")

    def write(self, out_dir: str | Path, stem: str = "report") -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.md").write_text(self.markdown())
        (out / f"{stem}.html").write_text(self.html())
        for name, png in self.images.items():
            (out / name).write_bytes(png)
        return out


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return buf.getvalue()


def bar_png(labels: list[str], values: list[float], title: str, ylabel: str,
            annotate: list[str] | None = None) -> bytes:
    fig, ax = plt.subplots(figsize=FIGSIZE)
    bars = ax.bar(range(len(values)), values, color="#4477aa")
    ax.set_xticks(range(len(values)), labels, rotation=15 if len(labels) > 4 else 0)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    for b, text in zip(bars, annotate or [fmt(v) for v in values]):
        ax.annotate(text, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom")
    fig.tight_layout()
    return _png(fig)


def grouped_bar_png(labels: list[str], series: dict[str, list[float]], title: str, ylabel: str) -> bytes:
    fig, ax = plt.subplots(figsize=FIGSIZE)
    k = max(len(series), 1)
    width = 0.8 / k
    for j, (name, vals) in enumerate(series.items()):
        ax.bar([i + (j - (k - 1) / 2) * width for i in range(len(vals))], vals, width, label=name)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    return _png(fig)


def frontier_png(lines: dict[str, list[tuple[float, float]]], points: dict[str, tuple[float, float]],
                 title: str, xlabel: str = "mean cost per row", ylabel: str = "quality") -> bytes:
    """lines: name -> (cost, quality) points joined in cost order; points: labelled markers."""
    fig, ax = plt.subplots(figsize=FIGSIZE)
    for name, pts in lines.items():
        pts = sorted(p for p in pts if p[0] is not None and p[1] is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=name)
    for name, (c, q) in points.items():
        if c is None or q is None:
            continue
        ax.scatter([c], [q], s=60, zorder=3)
        ax.annotate(name, (c, q), textcoords="offset points", xytext=(5, 5))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if lines:
        ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def lines_png(x: list, series: dict[str, list[float]], title: str, xlabel: str, ylabel: str,
              logx: bool = False, logy: bool = False) -> bytes:
    fig, ax = plt.subplots(figsize=FIGSIZE)
    for name, ys in series.items():
        ax.plot(x, ys, marker="o", label=name)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def reliability_png(curves: dict[str, list[tuple[float, float, int]]], title: str) -> bytes:
    """Calibration curves: name -> [(predicted, observed, rows)] per bin, with the diagonal."""
    fig, ax = plt.subplots(figsize=FIGSIZE)
    ax.plot([0, 1], [0, 1], color="#999", linestyle="--", label="perfect calibration")
    for name, pts in curves.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.set_xlabel("predicted probability the answer is right")
    ax.set_ylabel("observed share right")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)
