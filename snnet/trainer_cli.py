"""The LightningCLI behind ``snnet fit/validate/test/predict`` (:class:`SNNetCLI`).

Kept apart from :mod:`snnet.cli` so that the other commands, and the processes they start (``snnet
serve``'s inference worker imports the command's module when it is spawned), do not import
Lightning (about 190 MB of modules: Lightning pulls in transformers, matplotlib and scipy).
"""
from __future__ import annotations

import sys
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Any, Sequence

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from snnet.arguments import argument_line
from snnet.checkpoint_io import CheckpointError, is_complete, network_mismatch, read_checkpoint
from snnet.checkpoint_write import AtomicCheckpointIO
from snnet.commands import LIGHTNING_COMMANDS
from snnet.errors import UsageError

LIGHTNING_CKPT_NAMES = ("last", "best", "hpc")  # --ckpt_path values the trainer resolves itself


class SNNetCLI(LightningCLI):
    """LightningCLI with the datamodule sized from the model's data config, atomic checkpoint
    writes, and checked ``--ckpt_path`` files.

    The model is chosen by ``model.class_path`` in the config (``snnet.sn_net.module.SNNetModule`` for
    SN-Net, other snnet modules for the other methods); each exposes ``data_config``.
    """

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """LightningCLI's parse; a bad option or config key is one line (:func:`snnet.arguments.argument_line`)."""
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as e:
            words = sys.argv[1:] if args is None else list(args)
            subcommands = getattr(self, "_subcommand_parsers", {})  # none with run=False
            command = next((w for w in words if w in subcommands), None)
            raise UsageError(argument_line(subcommands.get(command, parser), str(e))) from e

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.data_config", "data.init_args.data_config", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        # LightningCLI replaces the config's model by the --ckpt_path checkpoint's hyper-parameters:
        # check the file and that it holds the config's network before anything runs or is written
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and not (ckpt_path in LIGHTNING_CKPT_NAMES or str(ckpt_path).startswith("registry")):
            path = Path(ckpt_path)
            if path.is_dir():
                found = sorted(path.rglob("*.ckpt"))
                hint = f" (it holds {len(found)}: {', '.join(str(p) for p in found[:3])})" if found else " (it holds no *.ckpt)"
                raise IsADirectoryError(f"--ckpt_path {path} is a folder: give one checkpoint file{hint} or 'last'")
            checkpoint = read_checkpoint(path)  # names a missing or unreadable file
            if "pytorch-lightning_version" not in checkpoint:  # the trainer needs it to restore anything
                raise CheckpointError(f"--ckpt_path {path}: not written by a Lightning Trainer (no pytorch-lightning_version); "
                                      "give a checkpoint saved by `snnet fit`")
            model = self.config[subcommand].get("model")
            if model is not None:
                init_args = model.get("init_args")
                config = {"class_path": model.get("class_path"), **(init_args.as_dict() if init_args is not None else {})}
                mismatch = network_mismatch(config, checkpoint.get("hyper_parameters") or {})
                if mismatch:
                    raise CheckpointError(f"--ckpt_path {path} holds another network than the config: {mismatch}; "
                                          "give the config this checkpoint was trained with, or a checkpoint of this config")
        super()._parse_ckpt_path()

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        """``--ckpt_path last`` resumes from the newest complete checkpoint of the run's checkpoint
        folders: after a kill during a save, a step checkpoint can be newer than ``last.ckpt``, and
        a file cut off by a non-atomic writer is passed over (with a warning naming it)."""
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if kwargs.get("ckpt_path") == "last":
            folders = {Path(cb.dirpath) for cb in self.trainer.checkpoint_callbacks
                       if isinstance(cb, ModelCheckpoint) and cb.dirpath and Path(cb.dirpath).is_dir()}
            found = sorted((p for folder in folders for p in folder.glob("*.ckpt")), key=lambda p: p.stat().st_mtime, reverse=True)
            for path in found:
                if is_complete(path):
                    kwargs["ckpt_path"] = str(path)
                    print(f"snnet {subcommand}: --ckpt_path last: resuming from {path}", file=sys.stderr)
                    break
                warnings.warn(f"--ckpt_path last: passing over {path}, an incomplete checkpoint (a save that was cut off)")
        return kwargs

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer, saving checkpoints atomically unless a config gives its own checkpoint IO plugin."""
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer


def build_cli(args: Sequence[str] | None = None, run: bool = True) -> SNNetCLI:
    """The LightningCLI behind fit/validate/test/predict (``run=False``: parse and instantiate only)."""
    return SNNetCLI(
        LightningModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=None if args is None else list(args),
        run=run,
        save_config_kwargs={"overwrite": True},
        # parse errors raise (one line from main) instead of printing usage and exiting
        parser_kwargs={"default_env": False, "exit_on_error": False,
                       **{name: {"exit_on_error": False} for name in LIGHTNING_COMMANDS}},
    )
