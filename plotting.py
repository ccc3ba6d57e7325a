"""Figures for analyze.py and bench.py: matplotlib is optional, needed only when a plot is asked for."""
from model import UsageError


def pyplot():
    """matplotlib's pyplot, drawing to files only; matplotlib is needed just for --plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install matplotlib") from None
    return plt


def save_figure(fig, file, dpi):
    fig.tight_layout()
    try:
        fig.savefig(file, dpi=dpi)
    except OSError as e:
        raise UsageError(f"cannot write {file} ({e.strerror})") from None
