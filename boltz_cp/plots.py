"""Pictures of a prediction: a PAE heatmap with chain boundaries and a per-token pLDDT plot per
model, written as PNG next to the model's files on the writer rank (`plots=true`).

Drawn from the arrays upstream's writer saves (the gathered `pae`, `plddt`), numbered like its
files (model k = rank k by confidence score). The PAE matrix is block-averaged down to the
figure's pixels first, so the cost of a picture barely grows with N (benchmarks/RESULTS.md).
matplotlib is imported lazily, with the Agg canvas and no pyplot state; without it, plots are
skipped with one warning.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

PAE_PIXELS = 512  # the heatmap's side in the PNG; PAE is block-averaged to at most this
PAE_MAX = 32.0  # Angstrom: upstream's PAE bins span 0-32
DPI = 100
_warned = False


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def block_mean(a: np.ndarray, size: int) -> np.ndarray:
    """`a` (N x M) averaged over a grid of at most size x size near-equal blocks; a itself when small."""
    n, m = a.shape
    if n <= size and m <= size:
        return a
    rows = np.linspace(0, n, min(n, size) + 1).astype(np.int64)[:-1]
    cols = np.linspace(0, m, min(m, size) + 1).astype(np.int64)[:-1]
    sums = np.add.reduceat(np.add.reduceat(a, rows, axis=0, dtype=np.float64), cols, axis=1)
    counts = np.outer(np.diff(np.append(rows, n)), np.diff(np.append(cols, m)))
    return (sums / counts).astype(np.float32)


def chain_spans(asym_id: np.ndarray) -> list[tuple[int, int, int]]:
    """(asym id, first token, end token) of each run of equal chain ids, in token order."""
    asym_id = np.asarray(asym_id)
    starts = np.flatnonzero(np.r_[True, asym_id[1:] != asym_id[:-1]])
    ends = np.r_[starts[1:], len(asym_id)]
    return [(int(asym_id[s]), int(s), int(e)) for s, e in zip(starts, ends)]


def _chain_axes(ax, spans, names, n: int, axis: str) -> None:
    """Lines at the chain boundaries, chain names at the chains' middles (if they fit)."""
    for _, start, _ in spans[1:]:
        ax.axvline(start, color="black", lw=0.8)
        if axis == "xy":
            ax.axhline(start, color="black", lw=0.8)
    if len(spans) <= 40:
        mids = [(s + e) / 2 for _, s, e in spans]
        labels = [names.get(a, str(a)) for a, _, _ in spans]
        ax.set_xticks(mids, labels, fontsize=7)
        if axis == "xy":
            ax.set_yticks(mids, labels, fontsize=7)
    ax.set_xlim(0, n)


def pae_figure(pae: np.ndarray, spans, names: dict, title: str):
    from matplotlib.figure import Figure

    n = pae.shape[0]
    fig = Figure(figsize=(6.4, 5.6), dpi=DPI)
    ax = fig.add_subplot()
    image = ax.imshow(block_mean(pae, PAE_PIXELS), cmap="Greens_r", vmin=0.0, vmax=PAE_MAX,
                      extent=(0, n, n, 0), interpolation="nearest")
    _chain_axes(ax, spans, names, n, "xy")
    ax.set_ylim(n, 0)
    ax.set_xlabel("scored residue (token)")
    ax.set_ylabel("aligned residue (token)")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="expected position error (Å)")
    return fig


def plddt_figure(plddt: np.ndarray, spans, names: dict, title: str):
    from matplotlib.figure import Figure

    n = plddt.shape[0]
    values = 100.0 * plddt
    fig = Figure(figsize=(8.0, 3.2), dpi=DPI)
    ax = fig.add_subplot()
    for lo, hi, color in ((90, 100, "#0053d6"), (70, 90, "#65cbf3"), (50, 70, "#ffdb13"), (0, 50, "#ff7d45")):
        ax.axhspan(lo, hi, color=color, alpha=0.15, lw=0)
    ax.plot(np.arange(n) + 0.5, values, color="black", lw=0.8)
    _chain_axes(ax, spans, names, n, "x")
    ax.set_ylim(0, 100)
    ax.set_xlabel("residue (token)")
    ax.set_ylabel("pLDDT")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def write_plots(pred: dict, asym_id, chain_names: dict, record_id: str, folder: Path, log) -> list[Path]:
    """`pae_<id>_model_<k>.png` and `plddt_<id>_model_<k>.png` for each model in `pred` (upstream's
    prediction dict); k ranks the models by confidence score as upstream's writer does."""
    import torch

    global _warned
    if not available():
        if not _warned:
            log.warn("WARNING: matplotlib is not installed: no PAE / pLDDT plots (pip install matplotlib)")
            _warned = True
        return []
    plddt = pred["plddt"].float().cpu().numpy()
    n_models, n = plddt.shape
    spans = chain_spans(np.asarray(asym_id)[:n])
    score = pred.get("confidence_score")
    order = torch.argsort(score, descending=True).tolist() if score is not None else range(n_models)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for rank, idx in enumerate(order):
        figures = [("plddt", plddt_figure(plddt[idx], spans, chain_names, f"{record_id} model {rank}: pLDDT"))]
        if pred.get("pae") is not None:
            pae = pred["pae"][idx].float().cpu().numpy()
            figures.append(("pae", pae_figure(pae, spans, chain_names, f"{record_id} model {rank}: PAE")))
        for kind, fig in figures:
            path = folder / f"{kind}_{record_id}_model_{rank}.png"
            fig.savefig(path)
            written.append(path)
    return written
