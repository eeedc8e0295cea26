"""The one place matplotlib is set up. Every plot here is a file written on a machine that may
have no display (a Ray worker, CI, a pod), so the backend is the off-screen Agg; matplotlib is
imported only when a plot is drawn, which keeps it out of training and serving imports."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path, dpi: int = 110) -> Path:
    """Write the figure and free it (figures kept open pile up across a long comparison)."""
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return Path(path)
