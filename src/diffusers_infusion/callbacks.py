"""``callback_on_step_end`` during an Infusion call: the callback sees the output's rows, not the ``[F | C]`` batch.

Inside an Infusion call the sampling loop runs on ``[F | C]`` (METHOD.md, "Sampling"), but a callback written for
diffusers (latent previews, interrupts, dynamic guidance, schedules that edit latents) expects one row per returned
image. :class:`OutputRowsCallback` wraps the user's callback: every tensor input whose batch is the internal batch
(``latents``, ``negative_prompt_embeds``; twice that under guidance: ``prompt_embeds``, ``add_text_embeds``,
``add_time_ids``) is shown with the rows of the returned images, in the returned order (per guidance half). What the
callback returns is written back:

* a row that is a returned image (a C row, or an F row of an image no concept applies to) takes the returned value
  exactly, so an edit takes effect on the returned image;
* an F row behind C rows (the base stream of a concept image, seen only through ``return_base_images``) takes the
  same *change* as its C row: ``z_F ← z_F + (z_C' − z_C)`` (the mean change of its C rows when variants share it).

Why F follows C's change rather than keeping its own latents: C attends with F's queries, so F must see what
the callback did to the image, or C's layout would come from a run the edit never reached; and adding the same
change keeps ``z_C − z_F``, the concept's contribution so far, untouched. For changes that do not depend on the
latents (added noise or patterns, previews, interrupts: the callback returns the tensor it got) F is then exactly
what the callback would have made of F; for an edit that is a function of the latents (``z ← 0``, clamping) F
gets C's change, not the function applied to F, since a callback runs once per step and is never called again
on F (that would repeat its side effects).

A callback may also return fewer guidance halves than it was shown (diffusers' ``SDCFGCutoffCallback`` keeps
``prompt_embeds[-1:]``, the conditional half, and sets the guidance scale to 0): the returned rows then stand for
the last halves of the tensor, and the F rows of those halves are written back by the same rules.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .errors import InfusionCallError


class OutputRowsCallback:
    """A ``callback_on_step_end`` shown the returned images' rows of an Infusion call's ``[F | C]`` batch.

    Args:
        callback: The user's callback ``(pipe, step, timestep, callback_kwargs) -> dict`` (or a diffusers
            ``PipelineCallback``).
        shown_rows: For each returned image, the row of the internal batch it comes from.
        f_row_of: For each C row of the internal batch, the F row it takes its attention maps from.
        n_rows: Rows of the internal batch (F rows + C rows).
    """

    def __init__(self, callback: Callable[..., Any], *, shown_rows: Sequence[int], f_row_of: Mapping[int, int],
                 n_rows: int) -> None:  # fmt: skip
        self.callback, self.n_rows, self.n_out = callback, n_rows, len(shown_rows)
        self.shown = torch.tensor(list(shown_rows), dtype=torch.long)
        self.direct: dict[int, int] = {}  # internal row -> the first output row showing it
        for o, r in enumerate(shown_rows):
            self.direct.setdefault(r, o)
        # F rows not shown themselves: output rows of their C rows (whose changes they take)
        self.hidden: dict[int, list[int]] = {}
        for o, r in enumerate(shown_rows):
            f = f_row_of.get(r)
            if f is not None and f not in self.direct:
                self.hidden.setdefault(f, []).append(o)

    def _halves(self, value: Any) -> int:
        """How many internal batches ``value`` stacks (1, or 2 under guidance); 0 if it is not a batch tensor."""
        if not isinstance(value, torch.Tensor) or value.ndim == 0:
            return 0
        for k in (1, 2):
            if value.shape[0] == k * self.n_rows:
                return k
        return 0

    def _show(self, value: torch.Tensor, k: int) -> torch.Tensor:
        index = torch.cat([self.shown + h * self.n_rows for h in range(k)]).to(value.device)
        return value.index_select(0, index)

    def _write_back(self, key: str, old: torch.Tensor, shown: torch.Tensor, new: Any, k: int) -> torch.Tensor:
        if not isinstance(new, torch.Tensor) or new.ndim == 0 or new.shape[0] % max(self.n_out, 1):
            raise InfusionCallError(
                f"callback_on_step_end returned {key!r} with shape {getattr(new, 'shape', type(new))}; it was "
                f"shown {tuple(shown.shape)} ({self.n_out} rows per guidance half, one per returned image). Return "
                "a tensor with those rows (or only the last guidance halves of them)."
            )
        m = new.shape[0] // self.n_out
        if not 1 <= m <= k:
            raise InfusionCallError(
                f"callback_on_step_end returned {key!r} with {new.shape[0]} rows; it was shown {shown.shape[0]} "
                f"({self.n_out} per guidance half). Return at most the rows it was shown."
            )
        halves = []
        for h in range(k - m, k):  # the returned rows are the last m halves of what was shown
            rows = slice(h * self.n_out, (h + 1) * self.n_out)
            ret = new[(h - (k - m)) * self.n_out :][: self.n_out].to(old.dtype)
            before, given = old[h * self.n_rows : (h + 1) * self.n_rows], shown[rows]
            after = before.clone()
            for r, o in self.direct.items():
                after[r] = ret[o]
            for f, outs in self.hidden.items():
                after[f] = before[f] + (ret[outs] - given[outs]).mean(0)
            halves.append(after)
        return torch.cat(halves)

    def __call__(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        internal = dict(callback_kwargs)
        halves = {key: self._halves(value) for key, value in internal.items()}
        shown = {key: self._show(v, halves[key]) for key, v in internal.items() if halves[key]}
        given = {key: v.clone() for key, v in shown.items()}  # as shown, should the callback edit in place
        returned = self.callback(pipe, step, timestep, {**internal, **shown})
        if returned is None:
            return {}
        return {
            key: self._write_back(key, internal[key], given[key], new, halves[key]) if key in shown else new
            for key, new in returned.items()
        }
