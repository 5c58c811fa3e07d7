"""What every section of the page reads: the rows and the tables derived from them once."""

from __future__ import annotations

from dataclasses import dataclass, field

from . import accuracy as accm
from . import decode as decm
from . import plots, tables, training
from .load import Data


@dataclass
class Context:
    data: Data
    reference: str
    show_patterns: bool
    csv: dict = field(default_factory=dict)  # file name -> table written beside index.html

    def __post_init__(self):
        rows = self.data.rows
        self.groups = dict(zip(rows["variant"], rows["group"], strict=True))
        self.looks = plots.Looks(
            dict(zip(rows["label"], rows["variant"], strict=True)), self.groups
        )
        self.cells = tables.speed_cells(rows)  # fwd and fwd_bwd
        self.exps = tables.exponents(
            self.cells, (("time", "latency_ms"), ("memory", "peak_mem_mb"))
        )
        self.dec = decm.decode_cells(rows)
        self.dec_exps = decm.decode_exponents(self.dec)
        self.train = training.with_kernel(
            training.against_full(training.train_cells(rows)), self.cells
        )
        self.acc_rows = accm.accuracy_rows(rows)  # one per seed
        self.acc = accm.accuracy_stats(rows)  # over seeds
