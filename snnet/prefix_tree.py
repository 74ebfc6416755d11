"""Many paths through shared steps, each shared prefix computed once: the trie behind SN-Net's
``forward_many``/``forward_rows`` (stitches that share a stem, front blocks and stitching layer) and
StitchNet's candidates (compositions that share fragments)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor


class PrefixTree:
    """A trie of configuration paths; evaluating a set of paths walks it depth first, holding one
    activation per tree level (memory grows with depth, not with the number of paths).
    ``step_of(prefix)`` is the step that ends ``prefix`` (a step's BatchNorm statistics depend on
    the whole path before it), resolved once per path position here, not per call."""

    def __init__(self, paths: list[tuple[tuple, ...]], step_of: Callable[[tuple], Callable[[Tensor], Tensor]]) -> None:
        self.paths = paths
        self.path_steps = [[step_of(path[:n]) for n in range(1, len(path) + 1)] for path in paths]

    def run(self, x: Tensor, ids: Sequence[int]) -> dict[int, Tensor]:
        root: dict = {}
        for i in ids:
            node = root
            for key, step in zip(self.paths[i], self.path_steps[i]):
                node = node.setdefault(key, (step, {}))[1]
            node.setdefault(None, []).append(i)
        out: dict[int, Tensor] = {}
        self._walk(root, x, out)
        return out

    def run_rows(self, x: Tensor, ids: Sequence[int]) -> Tensor:
        """Row r through path ids[r]; a trie node runs once on the rows of every path below it."""
        root: dict = {}
        for row, i in enumerate(ids):
            children = root
            for key, step in zip(self.paths[i], self.path_steps[i]):
                _, rows, children = children.setdefault(key, (step, [], {}))
                rows.append(row)
        out: list[Tensor] = []
        self._walk_rows(root, x, list(range(len(ids))), out, len(ids))
        return out[0]

    def _walk_rows(self, children: dict, h: Tensor, rows_h: list[int], out: list[Tensor], n: int) -> None:
        position = {r: p for p, r in enumerate(rows_h)}
        for step, rows, grandchildren in children.values():
            part = h if len(rows) == len(rows_h) else h[torch.tensor([position[r] for r in rows], device=h.device)]
            y = step(part)
            if grandchildren:
                self._walk_rows(grandchildren, y, rows, out, n)
                continue
            if not out:  # a path's last step (the head): scatter its rows into the batch output
                out.append(y.new_empty((n, *y.shape[1:])))
            out[0][torch.tensor(rows, device=y.device)] = y

    def steps(self, ids: Sequence[int]) -> list[tuple]:
        """The last key of every distinct prefix of these paths: the steps ``run`` computes."""
        prefixes = {self.paths[i][:n] for i in ids for n in range(1, len(self.paths[i]) + 1)}
        return [prefix[-1] for prefix in prefixes]

    def _walk(self, node: dict, h: Tensor, out: dict[int, Tensor]) -> None:
        for key, entry in node.items():
            if key is None:
                out.update(dict.fromkeys(entry, h))
            else:
                step, child = entry
                self._walk(child, step(h), out)
