"""Tables for notebooks: one HTML table renderer and one pandas conversion, for every tabular
result (intervention effects, TCAV reports, audits, SAE metrics...). pandas stays optional."""
from __future__ import annotations

import html
import math
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["html_table", "to_pandas"]


def _cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        shown = ", ".join(_cell(v) for v in list(value)[:6])
        return f"[{shown}{', …' if len(value) > 6 else ''}]"
    return html.escape(str(value))


def html_table(rows: Iterable[Mapping[str, Any]], columns: Sequence[str] | None = None, *, caption: str = "",
               max_rows: int = 50) -> str:
    """``rows`` (dicts) as an HTML table; numbers right-aligned to 4 significant digits, at most
    ``max_rows`` rows with a note of how many were left out."""
    rows = list(rows)
    columns = list(columns) if columns is not None else list(dict.fromkeys(k for row in rows for k in row))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = []
    for row in rows[:max_rows]:
        cells = []
        for column in columns:
            value = row.get(column)
            align = ' style="text-align:right"' if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
            cells.append(f"<td{align}>{_cell(value)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    more = f"<p>… {len(rows) - max_rows} more rows</p>" if len(rows) > max_rows else ""
    title = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{title}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{more}"


def to_pandas(rows: Iterable[Mapping[str, Any]], columns: Sequence[str] | None = None) -> Any:
    """``rows`` as a ``pandas.DataFrame`` (pandas is optional: ``pip install pandas``)."""
    try:
        import pandas
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("to_pandas needs pandas, which mechlens does not require: pip install pandas") from None
    return pandas.DataFrame(list(rows), columns=list(columns) if columns is not None else None)
