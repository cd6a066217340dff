"""Packed prefix trees: one sequence holds a shared prefix once and many branches after it.

A branch sees the prefix and itself, never another branch, and its tokens carry the
positions they would have in a plain prompt (prefix length + offset), so the logits at a
branch's last token equal those of the plain prompt `prefix + branch` exactly (up to float
rounding). This is what makes scoring 90 questions per response cost one prefix pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedTree:
    """Inputs for one packed sequence. Shapes: ids/positions (T,), allowed (T, T), last (n_branches,)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    allowed: torch.Tensor  # allowed[i, j]: token i may attend to token j
    last: torch.Tensor  # index of each branch's final token

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def pack_tree(prefix: list[int], branches: list[list[int]]) -> PackedTree:
    """Lay out `prefix` then every branch; build the tree attention mask."""
    if not branches or any(len(b) == 0 for b in branches):
        raise ValueError("a tree needs at least one branch and no empty branch")
    p = len(prefix)
    ids = list(prefix)
    positions = list(range(p))
    segment = [-1] * p
    last = []
    for k, branch in enumerate(branches):
        ids += branch
        positions += range(p, p + len(branch))
        segment += [k] * len(branch)
        last.append(len(ids) - 1)
    seg = torch.tensor(segment)
    idx = torch.arange(len(ids))
    causal = idx[:, None] >= idx[None, :]
    visible = (seg[:, None] == seg[None, :]) | (seg[None, :] == -1)
    return PackedTree(torch.tensor(ids), torch.tensor(positions), causal & visible, torch.tensor(last))


def collate_trees(trees: list[PackedTree], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad trees into a batch with a 4D boolean mask (B, 1, T, T).

    Padding tokens attend only to themselves so no attention row is empty (an empty row
    gives NaN in softmax); nothing real attends to them.
    """
    t = max(len(tr) for tr in trees)
    b = len(trees)
    input_ids = torch.full((b, t), pad_id, dtype=torch.long)
    position_ids = torch.zeros((b, t), dtype=torch.long)
    mask = torch.eye(t, dtype=torch.bool).repeat(b, 1, 1)
    for i, tr in enumerate(trees):
        n = len(tr)
        input_ids[i, :n] = tr.input_ids
        position_ids[i, :n] = tr.position_ids
        mask[i, :n, :n] = tr.allowed
    return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": mask[:, None]}


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask -> additive float mask, which every attention implementation accepts."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def branch_logits(model, trees: list[PackedTree], pad_id: int) -> list[torch.Tensor]:
    """Next-token logits at the end of every branch, one (n_branches, vocab) tensor per tree."""
    param = next(model.parameters())
    batch = {k: v.to(param.device) for k, v in collate_trees(trees, pad_id).items()}
    batch["attention_mask"] = additive_mask(batch["attention_mask"], param.dtype)
    hidden = model.model(**batch).last_hidden_state
    out = []
    for i, tr in enumerate(trees):
        out.append(model.lm_head(hidden[i, tr.last.to(param.device)]))
    return out
