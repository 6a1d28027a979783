"""Rich progress displays (shared by harvest, train, evaluate).

Whatever the terminal's width, the numbers come first (count, rate, ETA) and the bar takes what is
left: rich drops nothing, and a line that never wraps is one that the live display can erase, so no
stale line stays above what is printed after it. Training shows its per-SAE metrics as a table of
their own under the step line (StepProgress)."""
from __future__ import annotations

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Column, Table
from rich.text import Text


class RateColumn(ProgressColumn):
    """Units per second; `per` units per completed step (training counts steps, rates tokens)."""

    def __init__(self, unit: str = "tok", per: int = 1):
        super().__init__(table_column=Column(no_wrap=True))
        self.unit, self.per = unit, per

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed * self.per:,.0f} {self.unit}/s" if speed else f"- {self.unit}/s",
                    style="progress.data.speed")


class _Fixed(TextColumn):
    """A text column that never wraps (rich would otherwise fold it over two lines when narrow)."""

    def __init__(self, text: str, **kw):
        super().__init__(text, table_column=Column(no_wrap=True), **kw)


def _bar() -> BarColumn:
    # the only column that gives way when the terminal is narrow
    return BarColumn(bar_width=None, table_column=Column(ratio=1, min_width=4, no_wrap=True))


def token_progress(console: Console | None = None, disable: bool = False, unit: str = "tok",
                   transient: bool = False) -> Progress:
    return Progress(
        _Fixed("[bold]{task.description}"), MofNCompleteColumn(table_column=Column(no_wrap=True)),
        RateColumn(unit), _Fixed("eta"), TimeRemainingColumn(table_column=Column(no_wrap=True)), _bar(),
        TextColumn("{task.fields[info]}", table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
        TimeElapsedColumn(table_column=Column(no_wrap=True)),
        console=console, disable=disable, transient=transient, refresh_per_second=4, expand=True,
    )


class StepProgress(Progress):
    """Training's display: `label  step 120/1,000  45,678 tok/s  eta 0:01:02  ━━━━  0:00:09`, and
    under it one line per SAE (`set_metrics`). Transient: when it stops, nothing of it stays on the
    terminal, and the trainer prints its final line and tables below a clean screen."""

    MAX_ROWS = 8   # more SAEs than this: the first ones and a "+N more" line

    def __init__(self, tokens_per_step: int, console: Console | None = None, disable: bool = False):
        self.metrics: list[dict] | str | None = None   # before super(): its Live renders us at once
        super().__init__(
            _Fixed("[bold]{task.description}"), _Fixed("step"),
            MofNCompleteColumn(table_column=Column(no_wrap=True)), RateColumn("tok", per=tokens_per_step),
            _Fixed("eta"), TimeRemainingColumn(table_column=Column(no_wrap=True)), _bar(),
            TimeElapsedColumn(table_column=Column(no_wrap=True)),
            console=console, disable=disable, transient=True, refresh_per_second=4, expand=True)

    def set_metrics(self, metrics: list[dict] | str) -> None:
        """Rows of {"sae": name, metric: value, ...} (one line each), or one line of text."""
        self.metrics = metrics
        self.refresh()

    def get_renderables(self):
        yield self.make_tasks_table(self.tasks)
        if isinstance(self.metrics, str) and self.metrics:
            yield Text(self.metrics, no_wrap=True, overflow="ellipsis")
        elif self.metrics:
            yield metrics_table(self.metrics, self.MAX_ROWS)


def metrics_table(rows: list[dict], max_rows: int = 8) -> Table:
    """One line per SAE, its name first; values that do not fit are cut, never wrapped."""
    keys = [k for k in rows[0] if k != "sae"]
    table = Table.grid(padding=(0, 2))
    table.add_column(no_wrap=True, overflow="ellipsis", max_width=28)
    for _ in keys:
        table.add_column(no_wrap=True, justify="right")
    for row in rows[:max_rows]:
        table.add_row(Text(f"  {row['sae']}", style="cyan"),
                      *(Text(f"{k} {_number(row[k])}") for k in keys))
    if len(rows) > max_rows:
        table.add_row(Text(f"  +{len(rows) - max_rows} more SAEs"), *("" for _ in keys))
    return table


def _number(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"
    return str(v)
