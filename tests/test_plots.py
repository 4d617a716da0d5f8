"""PAE / pLDDT pictures (boltz_cp/plots.py). Tier: no PG.

The PNGs are written, named and ranked like upstream's files, are valid images, and show the
chain boundaries; the PAE heatmap is the block mean of the matrix at the figure's pixels. Speed
and memory at 5,000 tokens are measured in benchmarks/RESULTS.md, not here.
"""

from __future__ import annotations

import numpy as np
import torch
from recording_log import RecordingLog

from boltz_cp import plots


def test_block_mean_exact():
    a = np.arange(7 * 5, dtype=np.float32).reshape(7, 5)
    small = plots.block_mean(a, 3)
    rows, cols = [(0, 2), (2, 4), (4, 7)], [(0, 1), (1, 3), (3, 5)]
    want = np.array([[a[r0:r1, c0:c1].mean() for c0, c1 in cols] for r0, r1 in rows], dtype=np.float32)
    np.testing.assert_allclose(small, want, rtol=1e-6)
    assert plots.block_mean(a, 8) is a


def test_chain_spans():
    assert plots.chain_spans(np.array([0, 0, 0, 1, 1, 2, 0])) == [(0, 0, 3), (1, 3, 5), (2, 5, 6), (0, 6, 7)]


def _constant_lines(ax, axis: str) -> list[float]:
    """Positions of the lines constant along `axis` ("x": vertical lines)."""
    values = [set((line.get_xdata if axis == "x" else line.get_ydata)()) for line in ax.lines]
    return sorted(float(v.pop()) for v in values if len(v) == 1)


def test_pae_figure_draws_chain_boundaries():
    n, asym = 1500, np.repeat([0, 1, 2], [700, 500, 300])
    pae = np.random.default_rng(0).uniform(0, 32, (n, n)).astype(np.float32)
    fig = plots.pae_figure(pae, plots.chain_spans(asym), {0: "A", 1: "B", 2: "L"}, "t")
    ax = fig.axes[0]
    assert _constant_lines(ax, "x") == _constant_lines(ax, "y") == [700.0, 1200.0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["A", "B", "L"]
    shown = ax.images[0].get_array()
    assert shown.shape == (plots.PAE_PIXELS, plots.PAE_PIXELS)
    np.testing.assert_allclose(shown, plots.block_mean(pae, plots.PAE_PIXELS))


def test_write_plots_ranked_valid_pngs(tmp_path):
    import matplotlib.image

    n, asym = 30, np.repeat([0, 1], [18, 12])
    g = torch.Generator().manual_seed(0)
    pred = {
        "plddt": torch.rand(2, n, generator=g),
        "pae": torch.rand(2, n, n, generator=g) * 30,
        "confidence_score": torch.tensor([0.2, 0.9]),  # model 1 is ranked first
    }
    log = RecordingLog()
    written = plots.write_plots(pred, torch.tensor(asym), {0: "A", 1: "B"}, "x", tmp_path, log)
    names = sorted(p.name for p in written)
    assert names == ["pae_x_model_0.png", "pae_x_model_1.png", "plddt_x_model_0.png", "plddt_x_model_1.png"]
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(p)
        assert image.ndim == 3 and min(image.shape[:2]) > 200
    # model_0's PAE picture is of the better-scored sample (index 1): compare the two renderings
    best = plots.pae_figure(pred["pae"][1].numpy(), plots.chain_spans(asym), {0: "A", 1: "B"}, "x model 0: PAE")
    best.savefig(tmp_path / "want.png")
    assert (tmp_path / "want.png").read_bytes() == (tmp_path / "pae_x_model_0.png").read_bytes()
    fig = plots.plddt_figure(pred["plddt"][0].numpy(), plots.chain_spans(asym), {0: "A", 1: "B"}, "t")
    assert _constant_lines(fig.axes[0], "x") == [18.0]


def test_missing_matplotlib_warns_once(tmp_path, monkeypatch):
    monkeypatch.setattr(plots, "available", lambda: False)
    monkeypatch.setattr(plots, "_warned", False)
    log = RecordingLog()
    pred = {"plddt": torch.rand(1, 4), "pae": torch.rand(1, 4, 4)}
    for _ in range(2):
        assert plots.write_plots(pred, torch.zeros(4), {0: "A"}, "x", tmp_path, log) == []
    assert len(log.lines) == 1 and "matplotlib" in log.lines[0]
    assert not list(tmp_path.iterdir())
