"""matplotlib as the report draws with it: files only (Agg), and text drawn as given.

Labels are run folder names and setting labels, which may hold `$` (`cost_$5_vs_$10`): matplotlib's default
reads text between two `$` as TeX and fails on it (or draws something else), so math parsing is off.
Every sib module that draws imports `plt` from here.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
matplotlib.rcParams["text.parse_math"] = False
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["matplotlib", "plt"]
