"""HTML pieces of the page: escaping, notes, tables (plain and sortable), the page's style and
its one inline script (column sorting: no library, no network)."""

from __future__ import annotations

import html
import math

import pandas as pd

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0 auto;
max-width:1300px;padding:1em 2em;color:#222;line-height:1.45}
h1{margin-bottom:.2em} h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.82em;margin:.6em 0} th,td{border:1px solid #ccc;
padding:.2em .45em;text-align:left;vertical-align:top} th{background:#f3f3f3}
.scroll{overflow-x:auto} table.sortable th{cursor:pointer;vertical-align:bottom}
table.sortable th:after{content:" \\2195";color:#aaa} table.sortable td.n{text-align:right}
table.board{font-size:.72em} table.board td{white-space:nowrap;padding:.15em .3em}
td code{display:block;min-width:24em;white-space:pre-wrap;font-size:1em}
img{max-width:100%;height:auto;display:block;margin:.6em 0} nav a{margin-right:.8em}
.note{color:#555;font-size:.9em} .warn{background:#fff4e5;border-left:4px solid #f0a020;
padding:.4em .8em} .fail{background:#fdecea;border-left:4px solid #d93025;padding:.4em .8em}
.published{background:#eef4fb;border-left:4px solid #3b78c4;padding:.4em .8em}
.answer{background:#f1f8f1;border-left:4px solid #2e7d32;padding:.2em 1em}
.dirty{background:#d93025;color:#fff;font-weight:bold;padding:0 .3em;border-radius:3px}
code,pre{background:#f7f7f7;font-size:.85em} pre{padding:.6em;overflow:auto;white-space:pre-wrap}
"""

# Click a header: sort by that column's data-v (numbers as numbers; blanks stay last).
SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var down = th.dataset.dir !== "desc";
      table.querySelectorAll("th").forEach(function (h) { delete h.dataset.dir; });
      th.dataset.dir = down ? "desc" : "asc";
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
        if (x === "" || y === "") { return (x === "") - (y === ""); }
        var nx = parseFloat(x), ny = parseFloat(y);
        var c = isNaN(nx) || isNaN(ny) ? x.localeCompare(y) : nx - ny;
        return down ? -c : c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def esc(text) -> str:
    return html.escape(str(text))


def note(text: str, cls: str = "note") -> str:
    return f'<p class="{cls}">{esc(text)}</p>'


def img(uri: str | None, alt: str, missing: str) -> str:
    if uri is None:
        return note(missing)
    return f'<img src="{uri}" alt="{esc(alt)}">'


def details(summary: str, body: str) -> str:
    return f"<details><summary>{esc(summary)}</summary>{body}</details>"


def bullets(lines: list[str]) -> str:
    return "<ul>" + "".join(f"<li>{esc(x)}</li>" for x in lines) + "</ul>"


def table(df: pd.DataFrame, empty: str = "(none)", max_rows: int = 400) -> str:
    if df is None or df.empty:
        return note(empty)
    extra = note(f"... {len(df) - max_rows} more rows in the CSV") if len(df) > max_rows else ""
    body = df.head(max_rows).to_html(index=False, escape=True, na_rep="", float_format=fmt)
    return f'<div class="scroll">{body}</div>{extra}'


def one_machine(df: pd.DataFrame) -> pd.DataFrame:
    """Without its ``machine`` column when every row has the same one (the runs name it)."""
    if "machine" in df and df["machine"].nunique() <= 1:
        return df.drop(columns=["machine"])
    return df


def fmt(x: float) -> str:
    return f"{x:,.4g}" if abs(x) < 1e6 else f"{x:.3e}"


def sortable(
    values: pd.DataFrame, texts: pd.DataFrame, raw: set[str] = frozenset(), cls: str = ""
) -> str:
    """A table whose columns sort on a click: each cell shows ``texts`` and sorts by
    ``values``; columns in ``raw`` hold HTML already (escaped by the caller)."""
    head = "".join(f"<th>{'<br>'.join(map(esc, str(c).split()))}</th>" for c in texts.columns)
    rows = []
    for (_, v), (_, t) in zip(values.iterrows(), texts.iterrows(), strict=True):
        cells = []
        for col in texts.columns:
            key, shown = _sort_key(v[col]), t[col]
            align = ' class="n"' if isinstance(v[col], int | float) else ""
            text = shown if col in raw else esc(shown)
            cells.append(f'<td{align} data-v="{esc(key)}">{text}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    body = "".join(rows)
    return (
        f'<div class="scroll"><table class="sortable {cls}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


def _sort_key(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)
