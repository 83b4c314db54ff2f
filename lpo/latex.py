"""Report tables as LaTeX (booktabs), beside lpo.tables' Markdown and CSV, for the paper-form tables."""
from __future__ import annotations

from pathlib import Path

from lpo.io import atomic_path

_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
            "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def escape(text: str) -> str:
    return "".join(_SPECIAL.get(c, c) for c in text)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return escape(str(value))


def latex(rows: list[dict], columns: list[str] | None = None, caption: str = "", label: str = "") -> str:
    """A `table` float holding a booktabs tabular of `rows`; text columns left-aligned, numeric ones right."""
    if not rows:
        raise ValueError("latex() needs at least one row")
    columns = columns or list(rows[0])
    numeric = [all(isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool) for r in rows)
               for c in columns]
    lines = [r"\begin{table}[t]", r"\centering", r"\begin{tabular}{" + "".join("r" if n else "l" for n in numeric)
             + "}", r"\toprule", " & ".join(escape(c) for c in columns) + r" \\", r"\midrule"]
    lines += [" & ".join(_cell(r.get(c, "")) for c in columns) + r" \\" for r in rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        lines.append(r"\caption{" + escape(caption) + "}")
    if label:
        lines.append(r"\label{" + label + "}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def write_latex(path: str | Path, rows: list[dict], columns: list[str] | None = None, caption: str = "",
                label: str = "") -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(latex(rows, columns, caption, label))
