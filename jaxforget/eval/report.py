"""Reports of an unlearning run: per-request concept grids, metric curves over requests,
metrics.json / metrics.csv, and one self-contained HTML page that shows them all.

Rows are plain dicts, one per (method, request k): ``{"k": 3, "method": "dfr", "target":
"circle", "UA": 0.97, ...}`` (``EvalResult.row(k=..., method=..., target=...)`` makes them).
Plots use matplotlib's object API on an Agg canvas: no pyplot global state, no display needed.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from pathlib import Path
from typing import Any, Collection, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from jaxforget.eval.grids import make_grid, to_uint8

# metrics plotted / tabulated by default, in this order (others in rows are kept in files)
CURVE_METRICS = ("UA", "IRA", "CRA", "NRA", "ACC", "fid_proxy", "alignment", "cmmd", "attack_success")
RATE_METRICS = {"UA", "IRA", "CRA", "NRA", "ACC", "alignment", "attack_success", "attack_before"}  # in [0, 1]
FIRST_COLUMNS = ("method", "k", "target", "domain")


# ----------------------------------------------------------------------------- grid
def _removed_names(removed: Iterable[Any]) -> set[str]:
    return {r if isinstance(r, str) else r[0] for r in removed}


def concept_grid(
    images_by_concept: Mapping[str, np.ndarray],
    removed: Collection[Any],
    path: str | Path,
    *,
    title: str | None = None,
    scale: int | None = None,
) -> Path:
    """PNG grid: one row per concept (labelled), one column per seed; removed concepts (names,
    or (name, domain) pairs) get a red label with "(removed)" and a red frame.

    ``images_by_concept``: concept -> [n, H, W, 3] (uint8 or float in [0, 1]); shorter rows are
    padded with white. ``scale`` (default: up to ~64 px tiles) enlarges small images.
    """
    names = list(images_by_concept)
    if not names:
        raise ValueError("concept_grid needs at least one concept")
    arrays = [to_uint8(np.asarray(images_by_concept[n])) for n in names]
    shapes = {a.shape[1:] for a in arrays if len(a)}
    if len(shapes) > 1:
        raise ValueError(f"concept images differ in size: {sorted(shapes)}")
    h, w, _ = shapes.pop() if shapes else (8, 8, 3)
    cols = max(1, max(len(a) for a in arrays))
    flat = np.full((len(names) * cols, h, w, 3), 255, np.uint8)
    for r, a in enumerate(arrays):
        flat[r * cols: r * cols + len(a)] = a
    gone = _removed_names(removed)
    marked = [r for r, n in enumerate(names) if n in gone]
    labels = [f"{n} (removed)" if n in gone else n for n in names]
    scale = scale or max(1, 64 // max(h, w))
    grid = make_grid(flat, len(names), cols, scale=scale, row_labels=labels, marked_rows=marked)
    if title:
        canvas = Image.new("RGB", (grid.width, grid.height + 16), "white")
        canvas.paste(grid, (0, 16))
        ImageDraw.Draw(canvas).text((4, 2), title, fill="black")
        grid = canvas
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


# ----------------------------------------------------------------------------- curves
def _num(v: Any) -> float:
    try:
        return float(v) if v is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def _present(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> list[str]:
    return [m for m in metrics if any(math.isfinite(_num(r.get(m))) for r in rows)]


def plot_curves(
    rows: Sequence[Mapping[str, Any]],
    path: str | Path,
    metrics: Sequence[str] | None = None,
    *,
    x: str = "k",
    title: str | None = None,
) -> Path:
    """Metric curves over the request index ``x`` (PNG): one subplot per metric (default: those
    of ``CURVE_METRICS`` with a value in some row), one line per ``method`` (rows without one
    form a single line). NaN (e.g. UA at k = 0) leaves a gap."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    names = _present(rows, metrics or CURVE_METRICS)
    if not names:
        raise ValueError("no metric with a finite value to plot")
    methods = list(dict.fromkeys(str(r.get("method", "")) for r in rows))
    xs_all = [_num(r.get(x)) for r in rows if math.isfinite(_num(r.get(x)))]
    ncols = min(4, len(names))
    nrows = -(-len(names) // ncols)
    fig = Figure(figsize=(3.2 * ncols, 2.6 * nrows), dpi=100)
    FigureCanvasAgg(fig)
    for i, m in enumerate(names):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for method in methods:
            pts = sorted((_num(r.get(x)), _num(r.get(m))) for r in rows if str(r.get("method", "")) == method)
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", markersize=3, label=method or None)
        ax.set_title(m)
        ax.set_xlabel(x)
        if xs_all:  # one x range for every panel (UA starts at k = 1, an attack may be at k = K only)
            ax.set_xlim(min(xs_all) - 0.3, max(xs_all) + 0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        vals = [_num(r.get(m)) for r in rows]
        if m in RATE_METRICS and all(0.0 <= v <= 1.0 for v in vals if math.isfinite(v)):
            ax.set_ylim(-0.03, 1.03)  # rates on a fixed axis (a CLIPScore alignment is 0-100)
        ax.grid(alpha=0.3)
        if i == 0 and len(methods) > 1:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


# ----------------------------------------------------------------------------- files
DETECTION = "detection"  # a row's per-concept judge detection rate {concept: rate}: its own table


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    keys = list(dict.fromkeys(k for r in rows for k in r if k != DETECTION))
    first = [k for k in FIRST_COLUMNS if k in keys]
    metrics = [k for k in CURVE_METRICS if k in keys]
    return first + metrics + [k for k in keys if k not in first and k not in metrics]


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def write_metrics(
    rows: Sequence[Mapping[str, Any]], directory: str | Path, *, stem: str = "metrics"
) -> tuple[Path, Path]:
    """``metrics.json`` (a list of rows; NaN written as null) and ``metrics.csv`` (one column per
    key in any row; NaN and missing values empty). Returns both paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = directory / f"{stem}.json", directory / f"{stem}.csv"
    json_path.write_text(json.dumps([_jsonable(dict(r)) for r in rows], indent=1, allow_nan=False) + "\n")
    cols = _columns(rows)
    with open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(cols)
        for r in rows:
            out = []
            for c in cols:
                v = _jsonable(r.get(c))
                out.append("" if v is None else json.dumps(v) if isinstance(v, (list, dict)) else v)
            writer.writerow(out)
    det_rows = detection_table(rows)
    if det_rows:
        with open(directory / f"{stem}_{DETECTION}.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for r in det_rows for k in r)))
            writer.writeheader()
            writer.writerows(det_rows)
    return json_path, csv_path


def detection_table(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, concept): the judge's detection rate at every k (``k=0`` is the base
    model) and ``max_drop``, the largest fall below k = 0 while the concept was not yet removed
    (the retention check of a continual run); a removed concept's rates after its removal are in
    its columns too. Empty when the rows carry no per-concept detection."""
    have = sorted((r for r in rows if isinstance(r.get(DETECTION), Mapping) and r.get("k") is not None),
                  key=lambda r: r["k"])
    out = []
    for method in dict.fromkeys(str(r.get("method", "")) for r in have):
        mine = [r for r in have if str(r.get("method", "")) == method]
        removed_at = {str(r.get("target")): int(r["k"]) for r in mine if r.get("target")}
        base = mine[0][DETECTION] if mine[0]["k"] == 0 else {}
        for concept in mine[-1][DETECTION]:
            row: dict[str, Any] = {"method": method, "concept": concept,
                                   "removed_at_k": removed_at.get(concept, "")}
            drops = []
            for r in mine:
                v = r[DETECTION].get(concept)
                row[f"k={r['k']}"] = "" if v is None else round(float(v), 4)
                if v is not None and concept in base and r["k"] < removed_at.get(concept, 10 ** 9):
                    drops.append(float(base[concept]) - float(v))
            row["max_drop"] = round(max(drops), 4) if drops else ""
            out.append(row)
    return out


# ----------------------------------------------------------------------------- HTML
def _png_bytes(image: Any) -> bytes:
    if isinstance(image, (str, Path)):
        return Path(image).read_bytes() if str(image).lower().endswith(".png") else _png_bytes(Image.open(image))
    if isinstance(image, np.ndarray):
        arr = to_uint8(image)
        # a stack [n, H, W, 3] becomes one row, enlarged to ~64 px tiles like concept grids
        image = (make_grid(arr, 1, len(arr), scale=max(1, 64 // max(arr.shape[1:3]))) if arr.ndim == 4
                 else Image.fromarray(arr))
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(f"cannot embed an image of type {type(image).__name__}")


def _img_tag(image: Any, alt: str) -> str:
    data = base64.b64encode(_png_bytes(image)).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _fmt(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        return "–" if not math.isfinite(float(v)) else f"{float(v):.4g}" if abs(v) >= 10 else f"{float(v):.3f}"
    return "–" if v is None else html.escape(str(v))  # None: a NaN read back from metrics.json


def _table(rows: Sequence[Mapping[str, Any]], cols: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _summary(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per method: the base row (smallest k) and the last (largest k), as benchmark.md asks."""
    out = []
    for method in dict.fromkeys(str(r.get("method", "")) for r in rows):
        mine = sorted((r for r in rows if str(r.get("method", "")) == method), key=lambda r: _num(r.get("k")))
        picks = [mine[0]] if len(mine) == 1 else [mine[0], mine[-1]]
        out += [dict(r) for r in picks]
    return out


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:0.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f2f2f2}
td:first-child,th:first-child{text-align:left}
figure{display:inline-block;margin:0 1.5em 1.5em 0;vertical-align:top}
figcaption{font-size:13px;color:#555}img{max-width:100%}figure img{image-rendering:pixelated}
"""


def write_html_report(
    run_dir: str | Path,
    rows: Sequence[Mapping[str, Any]],
    images: Mapping[str, Any] | Sequence[Any] = (),
    *,
    title: str = "jaxforget unlearning report",
    filename: str = "report.html",
) -> Path:
    """One self-contained HTML page in ``run_dir``: the k = 0 / k = K table per method, the
    metric curves (written to ``run_dir/curves.png`` and embedded), the full metrics table, and
    ``images`` (caption -> PNG path, PIL image, array [H, W, 3] or a stack [n, H, W, 3] shown as
    one row; or a list of paths), all embedded as
    base64 PNGs so the file can be mailed or archived alone."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    items = list(images.items()) if isinstance(images, Mapping) else [(Path(p).stem, p) for p in images]
    cols = _columns(rows)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    if rows:
        if "k" in cols:
            parts += ["<h2>Base (first k) and final request (last k)</h2>", _table(_summary(rows), cols)]
            if _present(rows, CURVE_METRICS):
                curves = plot_curves(rows, run_dir / "curves.png")
                parts += ["<h2>Metrics over requests</h2>", _img_tag(curves, "metric curves")]
        parts += ["<h2>All metrics</h2>", _table(rows, cols)]
        det = detection_table(rows)
        if det:
            parts += ["<h2>Judge detection per concept over requests (max_drop: largest fall below the base "
                      "model before the concept's own removal)</h2>",
                      _table(det, list(dict.fromkeys(k for r in det for k in r)))]
    if items:
        parts.append("<h2>Images</h2>")
        for caption, image in items:
            parts.append(f"<figure>{_img_tag(image, caption)}<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</body></html>\n")
    path = run_dir / filename
    path.write_text("\n".join(parts))
    return path


__all__ = ["CURVE_METRICS", "concept_grid", "plot_curves", "write_metrics", "write_html_report", "detection_table"]
