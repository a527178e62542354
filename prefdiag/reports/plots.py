"""Plots for the HTML report as small inline SVG: no script, no network, no matplotlib. Every dot carries a
<title> (its pair id, margins and the start of its prompt) that a browser shows on hover; axes survive outliers
(symmetric-log scatter axes; histograms on the 1st-99th percentile range, with the values beyond counted in the
edge bins and named in the caption)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

import numpy as np
import pandas as pd

from prefdiag import flags
from prefdiag.reports.common import one_line

QUADRANTS = {  # (x sign, y sign): name, colour; x = ref_margin, y = policy_margin
    (1, 1): ("aligned", "#2e7d32"),
    (-1, 1): ("fixed by training", "#1565c0"),
    (1, -1): ("broken by training", "#c62828"),
    (-1, -1): ("still wrong", "#616161"),
}
NMR_COLOUR = "#d81b60"
CHOSEN, REJECTED, OTHER = "#1e88e5", "#fb8c00", "#6d4c41"
MAX_POINTS = 3000  # dots drawn per scatter (flagged pairs first, then an even sample); the caption says so
W, H, PAD_L, PAD_B, PAD_T, PAD_R = 480, 300, 52, 40, 12, 12


@dataclass
class Plot:
    """One figure of the HTML report: inline SVG with its title, caption and alt text."""

    title: str
    caption: str
    svg: str
    alt: str
    wide: bool = False  # a full-width figure in the report


def report_plots(table: pd.DataFrame | None) -> list[Plot]:
    """The plots a table supports: margins and log-prob changes with a policy, reference margins without; for
    unpaired (KTO) responses, per-token log-probs and log-ratios by label."""
    if table is not None and "response_id" in table.columns:
        return response_plots(table)
    if table is None or "ref_margin" not in table.columns or not table["ref_margin"].notna().any():
        return []
    if "non_finite" in table.columns:
        table = table[~table["non_finite"].astype(bool)]  # left out of every rate, and of the plots
    if "policy_margin" not in table.columns:
        plots = [histogram("Reference margin", {"ref_margin": table["ref_margin"]}, "ref_margin (nats)",
                           "Pairs left of 0 start DPO on the wrong side.", [OTHER])]  # fmt: skip
        if {"chosen_tokens", "rejected_tokens"} <= set(table.columns):
            plots.append(length_scatter(table))
        return plots
    return [
        quadrant_scatter(table),
        histogram("Margins, reference and policy", {"ref_margin": table["ref_margin"],
                  "policy_margin": table["policy_margin"]}, "margin: log p(chosen) - log p(rejected), nats",
                  "Where the mass sits left of 0, the model gives the rejected answer the higher likelihood.",
                  [OTHER, CHOSEN]),
        histogram("Reward margin", {"reward_margin": table["reward_margin"]},
                  "reward_margin = beta x (policy_margin - ref_margin)",
                  "Right of 0 counts as accurate in DPO's training logs (reward accuracy).", [CHOSEN]),
        histogram("Log-prob change from reference to policy", {"chosen_logratio": table["chosen_logratio"],
                  "rejected_logratio": table["rejected_logratio"]}, "policy logp - reference logp, nats",
                  "Chosen left of 0: likelihood displacement (the chosen answer became less likely).",
                  [CHOSEN, REJECTED]),
        histogram("DPO loss per pair", {"dpo_loss": table["dpo_loss"]},
                  "dpo_loss = -log sigmoid(reward_margin), log scale",
                  "Log-scaled axis. The dashed line is log 2, the loss of an untrained policy; the top tail holds the "
                  "likely mislabeled pairs.", [OTHER], marker=math.log(2), log_x=True),
    ]  # fmt: skip


def response_plots(table: pd.DataFrame) -> list[Plot]:
    """Unpaired (KTO) responses: the reference's per-token log-probs by label, and the policy's log-ratio by label."""
    if "ref_logp_per_token" not in table.columns or not table["ref_logp_per_token"].notna().any():
        return []
    table = table[~table["non_finite"].astype(bool)]
    desirable = table["label"].astype(bool)
    plots = [histogram("Reference log-prob per token, by label",
                       {"desirable": table.loc[desirable, "ref_logp_per_token"],
                        "undesirable": table.loc[~desirable, "ref_logp_per_token"]},
                       "log p_ref(completion) / tokens, nats",
                       "Where the desirable mass sits right of the undesirable, the reference already favours the "
                       "desirable responses.", [CHOSEN, REJECTED], marker=math.nan,
                       unit="responses")]  # fmt: skip
    if "logratio" in table.columns:
        per_token = table["logratio"] / table["completion_tokens"].where(table["completion_tokens"] > 0)
        plots.append(histogram("Log-prob change from reference to policy, per token, by label",
                               {"desirable": per_token[desirable], "undesirable": per_token[~desirable]},
                               "(policy - reference log-prob) / tokens, nats", "Desirable left of 0: likelihood "
                               "displacement (a desirable response became less likely).", [CHOSEN, REJECTED],
                               unit="responses"))  # fmt: skip
    return plots


def _finite(values: pd.Series) -> np.ndarray:
    data = values.to_numpy(float)
    return data[np.isfinite(data)]


def _symlog(values: np.ndarray, scale: float) -> np.ndarray:
    return np.sign(values) * np.log1p(np.abs(values) / scale)


def _symlog_ticks(limit: float, scale: float) -> list[float]:
    ticks = [0.0]
    step = scale
    while step <= limit * 1.0001:
        ticks += [step, -step]
        step *= 10
    return sorted(ticks)


def _svg(body: list[str], width: int = W, height: int = H, label: str = "") -> str:
    return (f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}" '
            f'xmlns="http://www.w3.org/2000/svg">' + "".join(body) + "</svg>")  # fmt: skip


def _text(x: float, y: float, text: str, anchor: str = "middle", cls: str = "", extra: str = "") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{f" class={chr(34)}{cls}{chr(34)}" if cls else ""}'
            f"{extra}>{escape(text)}</text>")  # fmt: skip


def _tick_label(value: float) -> str:
    return f"{value:g}" if abs(value) < 1e4 else f"{value:.0e}"


def _point_title(row: pd.Series) -> str:
    parts = [one_line(row.get("pair_id", ""), 40)]
    for column, name in (("ref_margin", "ref margin"), ("policy_margin", "policy margin"),
                         ("reward_margin", "reward margin")):  # fmt: skip
        if column in row.index and pd.notna(row[column]):
            parts.append(f"{name} {row[column]:.2f}")
    parts.append("prompt: " + one_line(row.get("prompt", ""), 80))
    return " · ".join(parts)


def _sample(table: pd.DataFrame, first: pd.Series) -> pd.DataFrame:
    if len(table) <= MAX_POINTS:
        return table
    flagged = table[first]
    rest = table[~first]
    keep = max(MAX_POINTS - len(flagged), 0)
    picks = rest.iloc[np.linspace(0, len(rest) - 1, keep).astype(int)] if keep and len(rest) else rest.head(0)
    return pd.concat([flagged.head(MAX_POINTS), picks])


def _scatter(table: pd.DataFrame, x_col: str, y_col: str, x_label: str, y_label: str, square: bool,
             colour_of, legend: list[tuple[str, str]], shade: bool = False) -> tuple[str, int]:  # fmt: skip
    x_all, y_all = table[x_col].to_numpy(float), table[y_col].to_numpy(float)
    ok = np.isfinite(x_all) & np.isfinite(y_all)
    rows = table[ok]
    width, height = (W, W) if square else (W, H)
    x, y = x_all[ok], y_all[ok]
    sx = max(float(np.median(np.abs(x))) / 4, 1e-3) if len(x) else 1.0
    sy = sx if square else max(float(np.median(np.abs(y))) / 4, 1e-3) if len(y) else 1.0
    sx, sy = (10 ** math.floor(math.log10(sx)), 10 ** math.floor(math.log10(sy)))
    tx, ty = _symlog(x, sx), _symlog(y, sy)
    lim_x = max(float(np.abs(tx).max()) if len(tx) else 1.0, 0.5) * 1.05
    lim_y = max(float(np.abs(ty).max()) if len(ty) else 1.0, 0.5) * 1.05
    if square:
        lim_x = lim_y = max(lim_x, lim_y)
    plot_w, plot_h = width - PAD_L - PAD_R, height - PAD_B - PAD_T
    px = lambda v: PAD_L + (v + lim_x) / (2 * lim_x) * plot_w  # noqa: E731
    py = lambda v: PAD_T + (lim_y - v) / (2 * lim_y) * plot_h  # noqa: E731
    body = [f'<rect x="{PAD_L}" y="{PAD_T}" width="{plot_w}" height="{plot_h}" class="frame"/>']
    if shade:
        for (qx, qy), (name, colour) in QUADRANTS.items():
            x0, y0 = (px(0), PAD_T) if qx > 0 else (PAD_L, PAD_T)
            y0 = PAD_T if qy > 0 else py(0)
            body.append(f'<rect x="{x0:.1f}" y="{y0:.1f}" width="{plot_w / 2:.1f}" height="{plot_h / 2:.1f}" '
                        f'fill="{colour}" fill-opacity="0.08"/>')  # fmt: skip
            n = int(((x > 0) if qx > 0 else (x <= 0)).__and__((y > 0) if qy > 0 else (y <= 0)).sum())
            tx0 = px(lim_x) - 6 if qx > 0 else PAD_L + 6
            ty0 = PAD_T + 16 if qy > 0 else PAD_T + plot_h - 8
            body.append(_text(tx0, ty0, f"{name} ({n})", "end" if qx > 0 else "start", "quad",
                              f' fill="{colour}"'))  # fmt: skip
        body.append(f'<line x1="{px(-lim_x):.1f}" y1="{py(-lim_y):.1f}" x2="{px(lim_x):.1f}" y2="{py(lim_y):.1f}" '
                    'class="diag"/>')  # fmt: skip
    for value in _symlog_ticks(float(np.abs(x).max()) if len(x) else 1, sx):
        body.append(f'<line x1="{px(_symlog(np.array([value]), sx)[0]):.1f}" y1="{PAD_T}" '
                    f'x2="{px(_symlog(np.array([value]), sx)[0]):.1f}" y2="{PAD_T + plot_h}" class="grid"/>')
        body.append(_text(px(_symlog(np.array([value]), sx)[0]), height - PAD_B + 14, _tick_label(value),
                          cls="tick"))  # fmt: skip
    for value in _symlog_ticks(float(np.abs(y).max()) if len(y) else 1, sy):
        yy = py(_symlog(np.array([value]), sy)[0])
        body.append(f'<line x1="{PAD_L}" y1="{yy:.1f}" x2="{PAD_L + plot_w}" y2="{yy:.1f}" class="grid"/>')
        body.append(_text(PAD_L - 4, yy + 4, _tick_label(value), "end", "tick"))
    body.append(f'<line x1="{px(0):.1f}" y1="{PAD_T}" x2="{px(0):.1f}" y2="{PAD_T + plot_h}" class="axis"/>')
    body.append(f'<line x1="{PAD_L}" y1="{py(0):.1f}" x2="{PAD_L + plot_w}" y2="{py(0):.1f}" class="axis"/>')
    body.append(_text(PAD_L + plot_w / 2, height - 6, x_label, cls="axlabel"))
    body.append(_text(14, PAD_T + plot_h / 2, y_label, cls="axlabel",
                      extra=f' transform="rotate(-90 14 {PAD_T + plot_h / 2:.1f})"'))  # fmt: skip
    colours = colour_of(rows)
    highlight = pd.Series(colours == NMR_COLOUR, index=rows.index)
    shown = _sample(rows, highlight)
    order = shown.index[np.argsort(highlight.loc[shown.index].to_numpy(), kind="stable")]  # highlighted on top
    for index in order:
        row = shown.loc[index]
        colour = colours[rows.index.get_loc(index)]
        r = 4.2 if colour == NMR_COLOUR else 3.2
        body.append(f'<circle cx="{px(_symlog(np.array([row[x_col]]), sx)[0]):.1f}" '
                    f'cy="{py(_symlog(np.array([row[y_col]]), sy)[0]):.1f}" r="{r}" fill="{colour}">'
                    f"<title>{escape(_point_title(row))}</title></circle>")  # fmt: skip
    legend_items = "".join(f'<span><i style="background:{c}"></i>{escape(t)}</span>' for c, t in legend)
    return _svg(body, width, height, f"{y_label} against {x_label}") + f'<p class="legend">{legend_items}</p>', len(
        shown
    )


def quadrant_scatter(table: pd.DataFrame) -> Plot:
    """ref_margin (x) against policy_margin (y) on symmetric-log axes, quadrants shaded and counted."""
    nmr = table["negative_margin_regime"].astype(bool) if "negative_margin_regime" in table.columns else None

    def colour_of(rows: pd.DataFrame) -> np.ndarray:
        marked = rows["negative_margin_regime"].astype(bool).to_numpy() if nmr is not None else np.zeros(len(rows))
        return np.where(marked, NMR_COLOUR, "#37474f")

    n_nmr = int(nmr.sum()) if nmr is not None else 0
    nmr_label = flags.label("negative_margin_regime")
    svg, shown = _scatter(table, "ref_margin", "policy_margin", "ref_margin (nats)", "policy_margin (nats)", True,
                          colour_of, [("#37474f", "pair"), (NMR_COLOUR, f"{nmr_label} ({n_nmr})")],
                          shade=True)  # fmt: skip
    n = int((table["ref_margin"].notna() & table["policy_margin"].notna()).sum())
    note = "" if shown >= n else f" {shown} of {n} pairs drawn (every flagged one, then an even sample)."
    return Plot(
        "Reference margin against policy margin",
        "Both axes symmetric-log (linear near 0, so long responses do not squeeze the rest). Above the dashed "
        "diagonal the reward margin is positive; below the horizontal axis the policy still prefers the rejected "
        "answer. Hover a dot for its pair." + note,
        svg, f"Scatter of ref_margin against policy_margin; {n_nmr} in the {nmr_label}.", wide=True,
    )  # fmt: skip


def length_scatter(table: pd.DataFrame) -> Plot:
    """Length difference (chosen - rejected tokens) against the reference margin, symmetric-log axes."""
    frame = table.assign(length_difference=(table["chosen_tokens"] - table["rejected_tokens"]).astype(float))

    def colour_of(rows: pd.DataFrame) -> np.ndarray:
        return np.where(rows["ref_margin"].to_numpy(float) < 0, REJECTED, CHOSEN)

    svg, _ = _scatter(frame, "length_difference", "ref_margin", "chosen tokens - rejected tokens", "ref_margin (nats)",
                      False, colour_of, [(CHOSEN, "reference prefers chosen"),
                                         (REJECTED, flags.label("ref_prefers_rejected"))])  # fmt: skip
    return Plot("Length difference against reference margin",
                "A summed log-prob falls with length: a strong slope means the margins mostly measure length.", svg,
                "Scatter of the length difference against ref_margin.")  # fmt: skip


def histogram(title: str, series: dict[str, pd.Series], xlabel: str, caption: str, colours: list[str],
              marker: float = 0.0, log_x: bool = False, unit: str = "pairs") -> Plot:  # fmt: skip
    """Overlaid histograms on shared bins over the 1st-99th percentile range (values beyond it are counted in
    the edge bins and named in the caption); bin width by the Freedman-Diaconis rule, 10 to 60 bins. ``log_x``
    bins log10 of positive values (a loss that spans decades)."""
    clean = {name: _finite(s) for name, s in series.items()}
    if log_x:
        clean = {name: np.log10(d[d > 0]) for name, d in clean.items()}
        marker = math.log10(marker) if marker > 0 else -math.inf
    values = np.concatenate(list(clean.values())) if clean else np.array([])
    if len(values) and values.min() < values.max():
        lo, hi = (float(v) for v in np.quantile(values, [0.01, 0.99]))
        if lo == hi:
            lo, hi = float(values.min()), float(values.max())
        inner = values[(values >= lo) & (values <= hi)]
        iqr = float(np.subtract(*np.quantile(inner if len(inner) else values, [0.75, 0.25])))
        width = 2 * iqr / len(values) ** (1 / 3) if iqr > 0 else (hi - lo) / 20
        bins = int(min(60, max(10, math.ceil((hi - lo) / width))))
    else:
        centre = float(values[0]) if len(values) else 0.0
        lo, hi, bins = centre - 1, centre + 1, 10
    edges = np.linspace(lo, hi, bins + 1)
    shown = 10**edges if log_x else edges  # the edges in the data's own units
    lo_shown, hi_shown = float(shown[0]), float(shown[-1])
    counts = {name: np.histogram(np.clip(d, lo, hi), bins=edges)[0] for name, d in clean.items()}
    top = max((int(c.max()) for c in counts.values() if len(c)), default=1) or 1
    plot_w, plot_h = W - PAD_L - PAD_R, H - PAD_B - PAD_T
    px = lambda v: PAD_L + (v - lo) / (hi - lo) * plot_w  # noqa: E731
    body = [f'<rect x="{PAD_L}" y="{PAD_T}" width="{plot_w}" height="{plot_h}" class="frame"/>']
    for k in range(5):
        yy = PAD_T + plot_h * k / 4
        body.append(f'<line x1="{PAD_L}" y1="{yy:.1f}" x2="{PAD_L + plot_w}" y2="{yy:.1f}" class="grid"/>')
        body.append(_text(PAD_L - 4, yy + 4, f"{top * (4 - k) / 4:.0f}", "end", "tick"))
    for k in range(6):
        value = lo + (hi - lo) * k / 5
        body.append(_text(px(value), H - PAD_B + 14, f"{10 ** value if log_x else value:.3g}", cls="tick"))
    opacity = 0.45 if len(clean) > 1 else 0.75
    for (name, count), colour in zip(counts.items(), colours):
        for i, c in enumerate(count):
            if not c:
                continue
            h = plot_h * c / top
            body.append(f'<rect x="{px(edges[i]):.1f}" y="{PAD_T + plot_h - h:.1f}" '
                        f'width="{max(px(edges[i + 1]) - px(edges[i]) - 0.5, 0.5):.1f}" height="{h:.1f}" '
                        f'fill="{colour}" fill-opacity="{opacity}"><title>{escape(name)}: {c} {unit} in '
                        f"[{shown[i]:.3g}, {shown[i + 1]:.3g}]</title></rect>")  # fmt: skip
    if lo <= marker <= hi:
        body.append(f'<line x1="{px(marker):.1f}" y1="{PAD_T}" x2="{px(marker):.1f}" y2="{PAD_T + plot_h}" '
                    'class="marker"/>')  # fmt: skip
    body.append(_text(PAD_L + plot_w / 2, H - 6, xlabel, cls="axlabel"))
    body.append(_text(14, PAD_T + plot_h / 2, unit, cls="axlabel", extra=f' transform="rotate(-90 14 '
                      f'{PAD_T + plot_h / 2:.1f})"'))  # fmt: skip
    beyond = [f"{name}: {int((d < lo).sum())} below {lo_shown:.3g}, {int((d > hi).sum())} above {hi_shown:.3g}"
              for name, d in clean.items() if ((d < lo) | (d > hi)).any()]  # fmt: skip
    legend = "".join(f'<span><i style="background:{c}"></i>{escape(n)} (n={len(clean[n])})</span>'
                     for n, c in zip(clean, colours))  # fmt: skip
    note = (" Values beyond the axis are counted in the edge bins (" + "; ".join(beyond) + ").") if beyond else ""
    medians = ", ".join(f"{name} median {10 ** np.median(d) if log_x else np.median(d):.3g}"
                        for name, d in clean.items() if len(d))  # fmt: skip
    return Plot(title, caption + note, _svg(body, label=title) + f'<p class="legend">{legend}</p>',
                f"Histogram of {', '.join(series)}; {medians}.")  # fmt: skip
