"""PNG figures from metric results (matplotlib, imported only when a figure is asked for)."""

from __future__ import annotations

import os
from typing import Any

from dsah_rt.atomic import atomic_write
from dsah_rt.errors import UserError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plots need matplotlib (pip install 'dsah-rt[plot]')") from None
    return plt


def plot_pr(results: dict[str, dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """Precision-recall by Hamming radius and precision@k, one line per named result."""
    plt = _pyplot()
    fig, (ax_pr, ax_pk) = plt.subplots(1, 2, figsize=(10, 4))
    for name, res in results.items():
        ax_pr.plot(res["pr_curve"]["recall"], res["pr_curve"]["precision"], marker=".", label=f"{name} ({res['bits']} bits)")
        ax_pk.semilogx(res["precision_at_k"]["k"], res["precision_at_k"]["precision"], marker=".", label=name)
    ax_pr.set(xlabel="recall", ylabel="precision", title="PR curve (Hamming radius 0..k)", xlim=(0, 1), ylim=(0, 1.02))
    ax_pk.set(xlabel="k (top-k, ties by index)", ylabel="precision@k", title="Precision@k", ylim=(0, 1.02))
    for ax in (ax_pr, ax_pk):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110), suffix=".png")
    plt.close(fig)
