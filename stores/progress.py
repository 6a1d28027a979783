"""Rich progress bars that show tokens/s and ETA (shared by harvest, train, evaluate)."""
from __future__ import annotations

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text


class RateColumn(ProgressColumn):
    def __init__(self, unit: str = "tok"):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} {self.unit}/s" if speed else f"- {self.unit}/s", style="progress.data.speed")


def token_progress(console: Console | None = None, disable: bool = False, unit: str = "tok",
                   transient: bool = False) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(unit),
        TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
        console=console, disable=disable, transient=transient, refresh_per_second=4,
    )
