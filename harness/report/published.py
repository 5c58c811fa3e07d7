"""Published figures shown beside our own (never mixed into them): see design/published.md."""

from __future__ import annotations

import pandas as pd

LRA_TABLE1_SOURCE = "Long Range Arena (Tay et al., ICLR 2021), Table 1: test accuracy (%)"
_LRA_COLUMNS = ["model", "ListOps", "Text", "Retrieval", "Image", "Pathfinder", "Path-X", "Avg"]
_LRA_ROWS = [
    ("Transformer", 36.37, 64.27, 57.46, 42.44, 71.40, "FAIL", 54.39),
    ("Local Attention", 15.82, 52.98, 53.39, 41.46, 66.63, "FAIL", 46.06),
    ("Sparse Trans.", 17.07, 63.58, 59.59, 44.24, 71.71, "FAIL", 51.24),
    ("Longformer", 35.63, 62.85, 56.89, 42.22, 69.71, "FAIL", 53.46),
    ("Linformer", 35.70, 53.94, 52.27, 38.56, 76.34, "FAIL", 51.36),
    ("Reformer", 37.27, 56.10, 53.40, 38.07, 68.50, "FAIL", 50.67),
    ("Sinkhorn Trans.", 33.67, 61.20, 53.83, 41.23, 67.45, "FAIL", 51.39),
    ("Synthesizer", 36.99, 61.68, 54.67, 41.61, 69.45, "FAIL", 52.88),
    ("BigBird", 36.05, 64.02, 59.29, 40.83, 74.87, "FAIL", 55.01),
    ("Linear Trans.", 16.13, 65.90, 53.09, 42.34, 75.30, "FAIL", 50.55),
    ("Performer", 18.01, 65.40, 53.82, 42.77, 77.05, "FAIL", 51.41),
]


def lra_table1() -> pd.DataFrame:
    return pd.DataFrame(_LRA_ROWS, columns=_LRA_COLUMNS)
