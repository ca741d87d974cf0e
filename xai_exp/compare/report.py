"""Self-contained HTML report of a comparison: table, plot and overlay gallery, all inline.

It takes a table and images (no store access): `gallery_rows` picks the images to show from
the per-image table, the caller fetches their overlays, `render_html` writes the page.

Everything the page shows is embedded (CSS in a <style> block, images as base64 ``data:`` URIs),
so the file can be mailed, attached to an MLflow run or opened offline.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
h3 { font-size: 1.05em; } h4 { font-size: 0.95em; }
.meta { color: #555; font-size: 0.9em; }
.table-wrap { overflow: auto; max-height: 70vh; border: 1px solid #ddd; }
table.comparison { border-collapse: collapse; font-size: 0.9em; }
table.comparison thead th { position: sticky; top: 0; }
table.comparison th, table.comparison td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
table.comparison th { background: #f2f2f2; }
table.comparison td { text-align: right; }
.plot img { max-width: 100%; }
.gallery { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; width: 520px; } figure img { width: 100%; border: 1px solid #ddd;
  cursor: zoom-in; }
figure img.full { position: fixed; inset: 2vh 2vw; width: 96vw; height: 96vh; object-fit: contain;
  background: rgba(0, 0, 0, 0.85); z-index: 10; cursor: zoom-out; border: 0; }
figcaption { font-size: 0.85em; word-break: break-word; }
.missing { width: 100%; height: 120px; background: #eee; display: flex;
           align-items: center; justify-content: center; color: #777; }
"""


@dataclass(frozen=True)
class GalleryItem:
    """One image of one run shown in the gallery (``png`` is None when no overlay was found)."""

    kind: str  # "best" | "worst"
    run_id: str
    run_name: str
    image: str
    iou: float
    settings: str
    png: bytes | None
    url: str | None = None  # the run's page in the MLflow UI


GALLERY_SIZE = 3


def settings_text(settings: Mapping[str, Any]) -> str:
    """A group's settings as ``key=value, ...`` (``method=gradcam, cam_top_fraction=0.1``)."""
    return ", ".join(
        f"{key}={'?' if pd.isna(value) else f'{value:g}' if isinstance(value, float) else value}"
        for key, value in settings.items()
    )


GALLERY_FIGURES = 12  # best (and as many worst) overlays per report, spread over settings


def gallery_size(settings: int) -> int:
    """Best (and worst) images per setting: `GALLERY_SIZE`, fewer when many settings share
    the report's `GALLERY_FIGURES`, never less than one."""
    return max(1, min(GALLERY_SIZE, GALLERY_FIGURES // max(settings, 1)))


def gallery_rows(images: pd.DataFrame, size: int = GALLERY_SIZE) -> list[tuple[str, pd.Series]]:
    """The `size` highest- and lowest-IoU images of one setting's rows; an image among the
    best is never among the worst (nor twice in one list), and with fewer than twice `size`
    images the best take the upper half."""
    scored = images.dropna(subset=["iou"])
    keys = ["iou", "run_name", "image"]
    ranked = scored.sort_values(keys, ascending=[False, True, True], kind="mergesort")
    ranked = ranked.drop_duplicates(subset=["image"], keep="first")
    best = ranked.head(min(size, (len(ranked) + 1) // 2))
    rest = ranked[~ranked["image"].isin(set(best["image"]))]
    worst = rest.sort_values(keys, ascending=[True, True, True], kind="mergesort").head(size)
    return [("best", row) for _, row in best.iterrows()] + [
        ("worst", row) for _, row in worst.iterrows()
    ]


def png_data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for embedding PNG bytes in HTML."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _shorten(text: str, limit: int = 90) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _figure(item: GalleryItem) -> str:
    iou = "n/a" if item.iou is None or math.isnan(item.iou) else f"{item.iou:.3f}"
    caption = (
        f"<b>{html.escape(item.image)}</b> IoU {iou}<br>"  # the setting is the section's title
        f"run {html.escape(_shorten(item.run_name))} ({html.escape(item.run_id[:8])})"
    )
    if item.url:
        caption += f' <a href="{html.escape(item.url, quote=True)}">open in MLflow</a>'
    if item.png is None:
        body = '<div class="missing">overlay not available</div>'
    else:
        alt = html.escape(f"{item.image} overlay", quote=True)
        zoom = "this.classList.toggle('full')"
        source = png_data_uri(item.png)
        body = f'<img alt="{alt}" title="click: full size" onclick="{zoom}" src="{source}">'
    return f"<figure>{body}<figcaption>{caption}</figcaption></figure>"


def _gallery(title: str, items: Sequence[GalleryItem]) -> str:
    if not items:
        return f"<h4>{html.escape(title)}</h4><p>No image with an IoU.</p>"
    figures = "\n".join(_figure(item) for item in items)
    return f'<h4>{html.escape(title)}</h4>\n<div class="gallery">\n{figures}\n</div>'


def _galleries(gallery: Sequence[GalleryItem]) -> str:
    """The best and worst agreeing images, under a heading per setting."""
    if not gallery:
        return "<h2>Best and worst agreeing images</h2><p>No image with an IoU.</p>"
    settings = list(dict.fromkeys(item.settings for item in gallery))
    parts = [
        "<h2>Best and worst agreeing images, per setting</h2>",
        '<p class="meta">Each setting\'s highest- and lowest-IoU images (per image its latest '
        "finished run); an image is never in both lists of one setting.</p>",
    ]
    for setting in settings:
        items = [item for item in gallery if item.settings == setting]
        best = [item for item in items if item.kind == "best"]
        worst = [item for item in items if item.kind == "worst"]
        parts += [
            f'<section class="setting"><h3>{html.escape(setting or "all runs")}</h3>',
            _gallery("Best agreeing images (highest IoU)", best),
            _gallery("Worst agreeing images (lowest IoU)", worst),
            "</section>",
        ]
    return "\n".join(parts)


GRID_ROWS = 100  # images shown in the report's IoU grid; every one is in iou_per_image.csv


def grid_rows(grid: pd.DataFrame, size: int = GRID_ROWS) -> pd.DataFrame:
    """The `size` images whose IoU varies most across settings (all when there are fewer)."""
    if len(grid) <= size:
        return grid
    spread = (grid.max(axis=1) - grid.min(axis=1)).fillna(-1.0)
    return grid.loc[spread.sort_values(ascending=False, kind="mergesort").index[:size]]


def _grid(grid: pd.DataFrame | None) -> str:
    """Images as rows, compared settings as columns, IoU shaded by value (`grid_rows`)."""
    if grid is None or grid.empty:
        return ""
    total, grid = len(grid), grid_rows(grid)
    note = (
        f'<p class="meta">{len(grid)} of {total} images: those whose IoU varies most across '
        "settings. Every image is in <code>iou_per_image.csv</code>.</p>\n"
        if len(grid) < total
        else ""
    )
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in grid.columns)
    rows = []
    for image, values in grid.iterrows():
        cells = []
        for value in values:
            if pd.isna(value):
                cells.append('<td class="na">–</td>')
            else:
                shade = f"rgba(31, 119, 180, {0.1 + 0.8 * float(value):.2f})"
                cells.append(f'<td style="background: {shade}">{float(value):.3f}</td>')
        rows.append(f"<tr><th>{html.escape(str(image))}</th>{''.join(cells)}</tr>")
    return (
        f"<h2>IoU per image and setting</h2>\n{note}"
        '<div class="table-wrap"><table class="comparison grid">'
        f"<thead><tr><th>image</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
    )


def html_table(frame: pd.DataFrame) -> str:
    """A table as escaped HTML: no index, 4 significant digits, missing values as a dash."""
    return frame.to_html(
        index=False,
        classes="comparison",
        border=0,
        na_rep="–",
        float_format=lambda value: f"{value:.4g}",
        escape=True,
    )


def _findings(findings: Sequence[str]) -> str:
    """The verdict and the small-sample warnings, first on the page."""
    if not findings:
        return ""
    items = "\n".join(f"<li>{html.escape(line)}</li>" for line in findings)
    return f'<h2>Findings</h2>\n<ul class="findings">\n{items}\n</ul>'


def _paired(paired: pd.DataFrame | None) -> str:
    """The paired comparisons: settings that differ in one key, on the images both compared."""
    if paired is None or paired.empty:
        return ""
    table = html_table(paired)
    return (
        "<h2>Paired comparisons</h2>\n"
        '<p class="meta">Two settings that differ in one key, on the images both compared: the '
        "mean difference a − b of agreement above chance (<code>iou_corrected</code>) and of raw "
        "IoU, each with its 95% bootstrap interval (resampling images) and the Wilcoxon "
        "signed-rank p-value; below 6 differing images no test can reach p &lt; 0.05, so none "
        "is given (<code>note</code>).</p>\n"
        f'<div class="table-wrap">{table}</div>'
    )


def _methods(pairs: pd.DataFrame | None) -> str:
    """Method x method matrices (mean top-f IoU, mean Spearman) per group of shared settings."""
    if pairs is None or pairs.empty:
        return ""
    from xai_exp.compare.method_agreement import as_matrix

    parts = [
        "<h2>Method agreement</h2>\n"
        '<p class="meta">Settings that differ only in the method, on the images all methods '
        "explained, from the cached maps (nothing recomputed): mean IoU of the two maps' top-f "
        "masks (LIME as its per-pixel weights, so not the table's IoU against LIME's top "
        "superpixels) and mean Spearman correlation of the maps.</p>"
    ]
    for (others, fraction), part in pairs.groupby(["others", "cam_top_fraction"], sort=False):
        images = int(part["images"].min())
        for value, title in (
            ("mean_top_f_iou", f"mean IoU of both maps' top {fraction:g}"),
            ("mean_spearman", "mean Spearman"),
        ):
            table = as_matrix(part, value).to_html(
                classes="comparison", border=0, na_rep="–", float_format=lambda v: f"{v:.3f}"
            )
            parts.append(
                f"<h3>{html.escape(str(others) or 'all runs')}: {html.escape(title)} "
                f'(n ≥ {images})</h3>\n<div class="table-wrap">{table}</div>'
            )
    return "\n".join(parts)


def render_html(
    title: str,
    meta: Sequence[str],
    findings: Sequence[str],
    table: pd.DataFrame,
    plot_png: bytes,
    gallery: Sequence[GalleryItem],
    grid: pd.DataFrame | None = None,
    paired: pd.DataFrame | None = None,
    methods: pd.DataFrame | None = None,
) -> str:
    """The report page as one string; every value from the runs is HTML-escaped."""
    table_html = html_table(table)
    meta_html = "<br>".join(html.escape(line) for line in meta)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<p class="meta">{meta_html}</p>
{_findings(findings)}
<h2>Runs grouped by settings</h2>
<p class="meta">n = compared images per row (the column <code>compared</code>); each mean has
its 95% bootstrap confidence interval (<code>_ci_low</code>, <code>_ci_high</code>: BCa,
resampling images, seeded); std is over images, not an interval.</p>
<div class="table-wrap">{table_html}</div>
<h2>Mean IoU vs CAM top fraction</h2>
<p class="meta">Left: raw IoU over the chance level of each setting's mask sizes (shaded: the
expected IoU of random masks of the same sizes). Right: agreement above chance,
(IoU − chance) / (ceiling − chance): 0 is chance, 1 the best the sizes allow.</p>
<div class="plot"><img alt="mean IoU vs CAM top fraction" src="{png_data_uri(plot_png)}"></div>
{_paired(paired)}
{_methods(methods)}
{_grid(grid)}
{_galleries(gallery)}
</body>
</html>
"""
