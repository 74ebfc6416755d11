"""Sweep: does every timm architecture module (and the listed torchvision models) split?

For each timm module the smallest model (parameter count, read on the meta device without
allocating weights) is built with random weights at its default input size, or 224 if larger (its
own size where the model does not run at 224, e.g. CrossViT's two branch sizes), and split with
``snnet.families.anchor_view``; the split is checked with ``check_view`` (stem -> blocks -> head ==
model(x), eval, float32). Writes the table to docs/families.md; per-model time is bounded by ``--timeout``.

    python tools/family_coverage.py --out docs/families.md            # everything (11 min, one process, 2 shared cores, 2026-12-02)
    python tools/family_coverage.py --modules convnext levit --torchvision none
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
import torchvision

from snnet.families import AnchorView, ProbeError, anchor_view, check_view, registered_adapter

TORCHVISION = [
    "alexnet", "vgg16", "densenet121", "mobilenet_v3_small", "mobilenet_v3_large", "resnet18", "resnet50",
    "efficientnet_b0", "convnext_tiny", "regnet_y_400mf", "swin_t", "vit_b_16",
]
MAX_SIZE = 224


@dataclass
class Row:
    source: str
    module: str
    model: str
    status: str  # pass / fail
    blocks: int = 0
    stages: str = ""
    layout: str = ""
    prefix_tokens: int = 0
    seconds: float = 0.0
    reason: str = ""
    size: str = ""  # probe input HxW


class Timeout(Exception):
    pass


def _alarm(_signum: int, _frame: object) -> None:
    raise Timeout()


SIZE_WORDS = ("test", "atto", "femto", "pico", "nano", "micro", "xxs", "tiny", "xs", "mini", "small", "s", "050",
              "b0", "18", "t", "light", "lite", "base")


def _size_rank(name: str) -> int:
    """How small a name sounds (lower is smaller): only the few best-ranked names get built."""
    parts = name.replace("-", "_").split("_")
    ranks = [i for i, w in enumerate(SIZE_WORDS) for p in parts if p == w or (len(w) > 2 and w in p)]
    return min(ranks, default=len(SIZE_WORDS))


def timm_modules() -> list[str]:
    """timm's own architecture modules (not ones other packages register, e.g. snnet's CIFAR ResNets)."""
    return [m for m in timm.list_modules() if importlib.util.find_spec(f"timm.models.{m}") is not None]


def smallest_model(module: str, candidates: int = 6) -> str:
    """Of the ``candidates`` names of ``module`` that sound smallest, the one with the fewest
    parameters (counted on the meta device, so no weights are allocated)."""
    best: tuple[int, str] | None = None
    names = sorted(timm.list_models(module=module), key=lambda n: (_size_rank(n), len(n), n))[:candidates]
    for name in names:
        try:
            with torch.device("meta"):
                n = sum(p.numel() for p in timm.create_model(name).parameters())
        except Exception:  # noqa: BLE001  (a model that cannot be built on meta is skipped here)
            continue
        if best is None or n < best[0]:
            best = (n, name)
    if best is None:
        raise RuntimeError(f"no model of timm module {module!r} can be built")
    return best[1]


def default_size(name: str) -> tuple[int, int, int]:
    return tuple(timm.get_pretrained_cfg(name).input_size) if timm.get_pretrained_cfg(name) else (3, 224, 224)


def build_timm(name: str, size: tuple[int, int, int]) -> torch.nn.Module:
    """``name`` built for ``size`` (``img_size`` where timm takes it and it differs from the default)."""
    if size != default_size(name):
        try:
            return timm.create_model(name, img_size=size[1])  # square sizes only
        except TypeError:  # no img_size argument: convolutional, any size works
            pass
    return timm.create_model(name)


def _split(model: torch.nn.Module, size: tuple[int, int, int]) -> AnchorView:
    model.eval()
    view = anchor_view(model, input_size=size)
    if registered_adapter(model) is not None:  # generic views are verified while splitting
        check_view(view, size)
    return view


def split_row(source: str, module: str, model_name: str, timeout: int) -> Row:
    start = time.perf_counter()
    signal.alarm(timeout)
    try:
        torch.manual_seed(0)
        if source == "timm":
            default = default_size(model_name)
            size = (default[0], MAX_SIZE, MAX_SIZE) if max(default[1:]) > MAX_SIZE else default
            try:
                view = _split(build_timm(model_name, size), size)
            except ProbeError:  # the model does not run at 224 (CrossViT's two branch sizes): its own size
                if size == default:
                    raise
                size = default
                view = _split(build_timm(model_name, size), size)
        else:
            size = (3, 224, 224)
            view = _split(torchvision.models.get_model(model_name, weights=None), size)
        stages = "/".join(str(d) for d in view.stage_depths)
        layouts = ",".join(dict.fromkeys(view.point_layouts[1:]))  # per block, in order of appearance
        prefix = max(view.point_prefix_tokens[1:])
        return Row(source, module, model_name, "pass", len(view.blocks), stages, layouts, prefix, time.perf_counter() - start, size=f"{size[1]}x{size[2]}")
    except Timeout:
        return Row(source, module, model_name, "fail", seconds=time.perf_counter() - start, reason=f"timeout ({timeout} s)")
    except Exception as err:  # noqa: BLE001  (every failure is a row with its reason)
        return Row(source, module, model_name, "fail", seconds=time.perf_counter() - start,
                   reason=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300])
    finally:
        signal.alarm(0)


def write_table(rows: list[Row], path: Path, command: str) -> None:
    timm_rows = [r for r in rows if r.source == "timm"]
    tv_rows = [r for r in rows if r.source == "torchvision"]
    passed = sum(r.status == "pass" for r in timm_rows)
    modules_done = len(timm_rows)
    lines = [
        "# Model families: coverage of the generic splitter",
        "",
        f"Generated by `{command}` (timm {timm.__version__}, torchvision {torchvision.__version__}, "
        f"torch {torch.__version__}; random weights; {time.strftime('%Y-%m-%d', time.gmtime())}, 2 shared CPU cores).",
        "Each row: the smallest model of the module at its default input size or 224 if larger (its own size "
        "where it does not run at 224), split by `snnet.families.anchor_view` and checked "
        "with `check_view` (stem -> blocks -> head == model(x), eval, float32, max abs diff < 1e-4).",
        "",
        f"**timm: {passed} of {modules_done} architecture modules swept pass** "
        f"(timm has {len(timm_modules())} architecture modules); "
        f"**torchvision: {sum(r.status == 'pass' for r in tv_rows)} of {len(tv_rows)}**.",
        "",
        "| source | module | model | input | status | blocks | stage depths | layout | prefix tokens | s | reason |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        reason = r.reason.replace("|", "\\|")
        lines.append(f"| {r.source} | {r.module} | {r.model} | {r.size} | {r.status} | {r.blocks or ''} | {r.stages} | "
                     f"{r.layout} | {r.prefix_tokens if 'tokens' in r.layout else ''} | {r.seconds:.1f} | {reason} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/families.md"))
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    parser.add_argument("--modules", nargs="*", default=None, help="timm modules (default: all)")
    parser.add_argument("--torchvision", nargs="*", default=TORCHVISION, help="torchvision models ('none': skip)")
    parser.add_argument("--timeout", type=int, default=300,
                        help="seconds per model (the largest, deepseek_vit_412m, took 29 s alone on 1 thread)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGALRM, _alarm)
    torch.set_num_threads(args.threads)
    command = ("python tools/family_coverage.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    jobs = [("torchvision", n.split("_")[0], n) for n in ([] if args.torchvision == ["none"] else args.torchvision)]
    jobs += [("timm", m, None) for m in (args.modules if args.modules is not None else timm_modules())]
    rows: list[Row] = []
    for source, module, name in jobs:
        try:
            name = name or smallest_model(module)
        except RuntimeError as err:
            rows.append(Row("timm", module, "", "fail", reason=str(err)))
            continue
        rows.append(split_row(source, module, name, args.timeout))
        print(json.dumps(asdict(rows[-1])), flush=True)
        write_table(rows, args.out, command)  # after every row, so an interrupted sweep keeps its table
        if args.json:
            args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))


if __name__ == "__main__":
    main()
