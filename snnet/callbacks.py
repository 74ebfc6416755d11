"""Writing per-stitch results where people look: a table, JSON/CSV files, a Pareto plot, W&B."""
from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from snnet.front import front_ids
from snnet.results import plot_pareto, print_table, save_results


class StitchReport(L.Callback):
    """After ``validate``/``test`` and at the end of ``fit``: print every scored stitch (the front
    marked) and the one-line summary of :mod:`snnet.front`, write ``<out_dir>/<stage>_results.{json,csv}``
    (the JSON holds the figures) and ``<stage>_pareto.png``, and log them to W&B.

    ``out_dir`` defaults to the logger's directory (or the trainer's root dir).
    """

    def __init__(self, out_dir: str | None = None) -> None:
        self.out_dir = out_dir

    def _dir(self, trainer: L.Trainer) -> Path:
        root = self.out_dir or trainer.log_dir or trainer.default_root_dir
        path = Path(root)
        path.mkdir(parents=True, exist_ok=True)
        return path

    @rank_zero_only
    def _report(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        results = getattr(module, "results", None)
        if not results:
            return
        out = self._dir(trainer)
        figures = getattr(module, "figures", None)
        metric = getattr(module, "metric", "acc1")  # ppl for a language model (lower is better)
        front = front_ids(results, metric) if all(getattr(r, metric) is not None for r in results) else None
        print_table(results, front=front)
        json_path, csv_path, png_path = out / f"{stage}_results.json", out / f"{stage}_results.csv", out / f"{stage}_pareto.png"
        save_results(results, json_path, csv_path, figures=figures.to_dict() if figures is not None else None)
        plot_pareto(results, png_path, metric=metric, title=f"{stage}: {metric} vs FLOPs of every stitch", front=front)
        if figures is not None:
            print(figures.summary())
        print(f"results: {json_path}  {csv_path}\nPareto plot: {png_path}")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                rows = [r.to_dict() for r in results]
                logger.log_table(key=f"{stage}/stitches", columns=list(rows[0]), data=[list(r.values()) for r in rows])
                logger.log_image(key=f"{stage}/pareto", images=[str(png_path)])
                if figures is not None:
                    logger.experiment.summary.update({f"{stage}/figures/{k}": v for k, v in figures.to_dict().items()})

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._report(trainer, module, "val")

    def on_test_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._report(trainer, module, "test")

    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._report(trainer, module, "fit")
