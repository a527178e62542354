"""Plots for the HTML report, drawn with matplotlib's Agg canvas (no display, no pyplot global state) and returned
as base64 PNG so the report is one file that works offline."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
import pandas as pd

QUADRANTS = {  # (x sign, y sign): name, colour; x = ref_margin, y = policy_margin
    (1, 1): ("aligned", "#2e7d32"),
    (-1, 1): ("fixed by training", "#1565c0"),
    (1, -1): ("broken by training", "#c62828"),
    (-1, -1): ("still wrong", "#616161"),
}
NMR_COLOUR = "#d81b60"
CHOSEN, REJECTED, OTHER = "#1e88e5", "#fb8c00", "#6d4c41"


@dataclass
class Plot:
    title: str
    caption: str
    png_base64: str
    alt: str
    wide: bool = False  # a full-width figure in the report


def report_plots(table: pd.DataFrame | None) -> list[Plot]:
    """The plots a table supports: margins and log-prob changes with a policy, reference margins without."""
    if table is None or "ref_margin" not in table.columns or not table["ref_margin"].notna().any():
        return []
    plots = []
    if "policy_margin" in table.columns:
        plots.append(quadrant_scatter(table))
        plots.append(
            histogram(
                "Margins, reference and policy",
                {"ref_margin": table["ref_margin"], "policy_margin": table["policy_margin"]},
                "margin: log p(chosen) - log p(rejected), nats",
                "Where the mass sits left of 0, the model gives the rejected answer the higher likelihood.",
                colours=[OTHER, CHOSEN],
            )
        )
        plots.append(
            histogram(
                "Reward margin",
                {"reward_margin": table["reward_margin"]},
                "reward_margin = beta * (policy_margin - ref_margin)",
                "Right of 0 counts as accurate in DPO's training logs (reward accuracy).",
                colours=[CHOSEN],
            )
        )
        plots.append(
            histogram(
                "Log-prob change from reference to policy",
                {"chosen_logratio": table["chosen_logratio"], "rejected_logratio": table["rejected_logratio"]},
                "policy logp - reference logp, nats",
                "Chosen left of 0: likelihood displacement (the chosen answer became less likely).",
                colours=[CHOSEN, REJECTED],
            )
        )
        plots.append(
            histogram(
                "DPO loss per pair",
                {"dpo_loss": table["dpo_loss"]},
                "dpo_loss = -log sigmoid(reward_margin)",
                "log 2 = 0.693 is the loss of an untrained policy; the top tail holds the likely mislabeled pairs.",
                colours=[OTHER],
                marker=(float(np.log(2)), "log 2 (policy = reference)"),
            )
        )
    else:
        plots.append(
            histogram(
                "Reference margin",
                {"ref_margin": table["ref_margin"]},
                "ref_margin: log p_ref(chosen) - log p_ref(rejected), nats",
                "Pairs left of 0 start DPO on the wrong side; few of them flip during training.",
                colours=[OTHER],
            )
        )
        if {"chosen_tokens", "rejected_tokens"} <= set(table.columns):
            plots.append(length_scatter(table))
    return plots


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return figure, figure.add_subplot()


def _png(figure) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _limits(*series: pd.Series) -> tuple[float, float]:
    values = np.concatenate([s.to_numpy(float) for s in series])
    values = values[np.isfinite(values)]
    lo, hi = (float(values.min()), float(values.max())) if len(values) else (-1.0, 1.0)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    pad = 0.08 * (hi - lo or 1.0)
    return lo - pad, hi + pad


def quadrant_scatter(table: pd.DataFrame) -> Plot:
    """ref_margin (x) against policy_margin (y), quadrants shaded and named, negative-margin-regime pairs marked."""
    figure, ax = _figure(8.0, 6.6)
    x, y = table["ref_margin"].astype(float), table["policy_margin"].astype(float)
    lo, hi = _limits(x, y)
    counts = {}
    for (sx, sy), (name, colour) in QUADRANTS.items():
        x0, x1 = (0, hi) if sx > 0 else (lo, 0)
        y0, y1 = (0, hi) if sy > 0 else (lo, 0)
        ax.axvspan(x0, x1, ymin=(y0 - lo) / (hi - lo), ymax=(y1 - lo) / (hi - lo), color=colour, alpha=0.09, lw=0)
        n = int(((x > 0 if sx > 0 else x <= 0) & (y > 0 if sy > 0 else y <= 0)).sum())
        counts[name] = n
        ax.text(
            x1 - 0.02 * (hi - lo) if sx > 0 else x0 + 0.02 * (hi - lo),
            y1 - 0.03 * (hi - lo) if sy > 0 else y0 + 0.03 * (hi - lo),
            f"{name} ({n})",
            ha="right" if sx > 0 else "left",
            va="top" if sy > 0 else "bottom",
            color=colour,
            fontsize=11,
            fontweight="bold",
        )
    ax.fill([lo, 0, lo], [lo, 0, 0], facecolor="none", edgecolor=NMR_COLOUR, hatch="///", lw=0, alpha=0.35,
            label="negative-margin region: above the diagonal, below 0")  # fmt: skip
    ax.axhline(0, color="#424242", lw=0.8)
    ax.axvline(0, color="#424242", lw=0.8)
    ax.plot([lo, hi], [lo, hi], ls="--", color="#9e9e9e", lw=1, label="policy = reference (reward margin 0)")
    nmr = table["negative_margin_regime"].astype(bool) if "negative_margin_regime" in table.columns else x.isna()
    ax.scatter(x[~nmr], y[~nmr], s=16, color="#37474f", alpha=0.65, lw=0, label=f"pairs ({int((~nmr).sum())})")
    ax.scatter(
        x[nmr], y[nmr], s=46, color=NMR_COLOUR, edgecolor="black", lw=0.6, zorder=3,
        label=f"negative-margin regime: reward margin > 0, policy margin < 0 ({int(nmr.sum())})",
    )  # fmt: skip
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("ref_margin (nats): reference log p(chosen) - log p(rejected)")
    ax.set_ylabel("policy_margin (nats): policy log p(chosen) - log p(rejected)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=9, frameon=False, ncol=1)
    ax.grid(alpha=0.25)
    summary = ", ".join(f"{name} {n}" for name, n in counts.items())
    return Plot(
        "Reference margin against policy margin",
        "Above the dashed diagonal the reward margin is positive (DPO counts the pair as learned); below the "
        "horizontal axis the policy still prefers the rejected answer. Marked pairs are both.",
        _png(figure),
        f"Scatter of ref_margin against policy_margin: {summary}; {int(nmr.sum())} in the negative-margin regime.",
        wide=True,
    )


def histogram(
    title: str,
    series: dict[str, pd.Series],
    xlabel: str,
    caption: str,
    colours: list[str] | None = None,
    marker: tuple[float, str] = (0.0, ""),
) -> Plot:
    """Overlaid histograms on shared bins, with a dashed line at ``marker`` (0 unless given)."""
    figure, ax = _figure(6.4, 3.6)
    clean = {name: s.to_numpy(float)[np.isfinite(s.to_numpy(float))] for name, s in series.items()}
    values = np.concatenate(list(clean.values())) if clean else np.array([])
    if len(values) and values.min() < values.max():
        edges = np.histogram_bin_edges(values, bins=min(40, max(8, int(np.sqrt(len(values))) * 2)))
    else:
        centre = float(values[0]) if len(values) else 0.0
        edges = np.linspace(centre - 1, centre + 1, 9)
    colours = colours or [CHOSEN, REJECTED, OTHER]
    for (name, data), colour in zip(clean.items(), colours):
        ax.hist(data, bins=edges, color=colour, alpha=0.35 if len(clean) > 1 else 0.7, label=f"{name} (n={len(data)})")
        ax.hist(data, bins=edges, color=colour, histtype="step", lw=1.4)
    ax.axvline(marker[0], color="#212121", lw=1, ls="--", label=marker[1] or None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("pairs")
    ax.legend(fontsize=9, frameon=False)
    ax.grid(alpha=0.25, axis="y")
    medians = ", ".join(f"{name} median {np.median(d):.3g}" for name, d in clean.items() if len(d))
    return Plot(title, caption, _png(figure), f"Histogram of {', '.join(series)}; {medians}.")


def length_scatter(table: pd.DataFrame) -> Plot:
    """Length difference (chosen - rejected tokens) against the reference margin."""
    figure, ax = _figure(6.4, 3.8)
    diff = (table["chosen_tokens"] - table["rejected_tokens"]).astype(float)
    margin = table["ref_margin"].astype(float)
    wrong = margin < 0
    ax.scatter(diff[~wrong], margin[~wrong], s=16, color=CHOSEN, alpha=0.7, lw=0, label="reference prefers chosen")
    ax.scatter(diff[wrong], margin[wrong], s=16, color=REJECTED, alpha=0.8, lw=0, label="reference prefers rejected")
    ax.axhline(0, color="#212121", lw=1, ls="--")
    ax.axvline(0, color="#9e9e9e", lw=0.8)
    ax.set_xlabel("chosen tokens - rejected tokens")
    ax.set_ylabel("ref_margin (nats)")
    ax.legend(fontsize=9, frameon=False)
    ax.grid(alpha=0.25)
    return Plot(
        "Length difference against reference margin",
        "A summed log-prob falls with length: a strong slope means the margins mostly measure length.",
        _png(figure),
        "Scatter of the length difference against ref_margin.",
    )
