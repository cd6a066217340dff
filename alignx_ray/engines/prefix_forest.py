"""Packed prefix forests: many requests in one sequence, every shared prefix laid out once.

A request is a prefix and its question branches. The prefixes of a pack form a radix tree:
the few-shot block shared by every response, under it one post per thread, under that one
comment per response, and each question branch is a leaf under its comment. The tree is laid
out depth-first, so the tokens of a node's subtree are one contiguous range, and

    token q may attend to token k  <=>  k <= q < subtree_end[k]

(k is q itself, an earlier token of its node, or a token of an ancestor node). Every token
carries the position it has in its own plain prompt, so the logits at a branch's last token
equal those of the plain prompt `prefix + branch` (up to float rounding). The rule needs one
integer per token, which is what a block-sparse kernel (FlexAttention) wants: blocks of
unrelated responses are skipped rather than masked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class _Node:
    tokens: list[int]
    children: dict[int, _Node] = field(default_factory=dict)  # by first token
    leaves: list[tuple[int, list[int]]] = field(default_factory=list)  # (slot, branch tokens)

    def split(self, at: int) -> None:
        """Keep tokens[:at] here; move the rest, with the children and leaves, to a new child."""
        tail = _Node(self.tokens[at:], self.children, self.leaves)
        self.tokens, self.children, self.leaves = self.tokens[:at], {tail.tokens[0]: tail}, []

    def insert(self, prefix: list[int]) -> tuple[_Node, int]:
        """The node where `prefix` (relative to the end of this node) ends, splitting nodes
        where it diverges, and how many tokens the tree gained."""
        if not prefix:
            return self, 0
        child = self.children.get(prefix[0])
        if child is None:
            child = self.children[prefix[0]] = _Node(list(prefix))
            return child, len(prefix)
        common = 0
        while common < min(len(child.tokens), len(prefix)) and child.tokens[common] == prefix[common]:
            common += 1
        if common < len(child.tokens):
            child.split(common)
        return child.insert(prefix[common:])


@dataclass(frozen=True)
class PackedForest:
    """One packed sequence. Shapes: input_ids/position_ids/subtree_end (T,), last (n_branches,)
    with the branches of all requests in order; `counts` branches per request."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    subtree_end: torch.Tensor
    last: torch.Tensor
    counts: list[int]

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def padded(self, length: int, pad_id: int) -> PackedForest:
        """Pad to `length` tokens that see only themselves and are seen by none."""
        n = length - len(self)
        return PackedForest(
            torch.cat([self.input_ids, torch.full((n,), pad_id, dtype=self.input_ids.dtype)]),
            torch.cat([self.position_ids, torch.zeros(n, dtype=self.position_ids.dtype)]),
            torch.cat([self.subtree_end, torch.arange(len(self), length) + 1]),
            self.last,
            self.counts,
        )

    def allowed(self) -> torch.Tensor:
        """The dense (T, T) boolean mask: allowed[q, k] = k <= q < subtree_end[k]."""
        return visibility_mask(torch.arange(len(self)), self.subtree_end, len(self))


def pack_forest(requests: list[tuple[list[int], list[list[int]]]], position_offset: int = 0) -> PackedForest:
    """Lay out the radix tree of the requests' prefixes with every branch as a leaf.

    `position_offset` is the length of a prefix every request shares that is not in the pack
    (its keys and values come from a cache).
    """
    root, counts = _Node([]), []
    for prefix, branches in requests:
        if not branches or any(len(b) == 0 for b in branches):
            raise ValueError("a request needs at least one branch and no empty branch")
        node, _ = root.insert(list(prefix))
        node.leaves += [(sum(counts) + i, list(b)) for i, b in enumerate(branches)]
        counts.append(len(branches))
    layout = _Layout(last=[0] * sum(counts))
    layout.add(root, position_offset)
    return PackedForest(
        torch.tensor(layout.ids),
        torch.tensor(layout.positions),
        torch.tensor(layout.end),
        torch.tensor(layout.last),
        counts,
    )


@dataclass
class _Layout:
    last: list[int]
    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    end: list[int] = field(default_factory=list)

    def add(self, node: _Node, depth: int) -> None:
        """Depth-first: the node's tokens, its leaves, its children; then every token of the
        node gets the end of the node's subtree."""
        start, n = len(self.ids), len(node.tokens)
        self._append(node.tokens, depth)
        for slot, branch in node.leaves:  # a leaf sees itself and its ancestors, never a sibling
            self._append(branch, depth + n)
            self.end[-len(branch) :] = [len(self.ids)] * len(branch)
            self.last[slot] = len(self.ids) - 1
        for child in node.children.values():
            self.add(child, depth + n)
        self.end[start : start + n] = [len(self.ids)] * n

    def _append(self, tokens: list[int], depth: int) -> None:
        self.ids += tokens
        self.positions += range(depth, depth + len(tokens))
        self.end += [0] * len(tokens)


def plan_packs(requests: list[tuple[list[int], list[list[int]]]], max_tokens: int) -> list[list[int]]:
    """Greedy, in order: indices of the requests of each pack, every pack's forest at most
    `max_tokens` (a request larger than that alone gets a pack of its own)."""
    packs: list[list[int]] = []
    root, size = None, 0
    for i, (prefix, branches) in enumerate(requests):
        branch_tokens = sum(map(len, branches))
        cost = branch_tokens + (root.insert(list(prefix))[1] if root else 0)
        if root is None or size + cost > max_tokens:  # start a new pack with this request
            root, size = _Node([]), 0
            cost = branch_tokens + root.insert(list(prefix))[1]
            packs.append([])
        packs[-1].append(i)
        size += cost
    return packs


def collate(forests: list[PackedForest], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad forests into a batch with a 4D boolean mask (B, 1, T, T).

    Padding tokens attend only to themselves so no attention row is empty (an empty row
    gives NaN in softmax); nothing real attends to them.
    """
    t = max(len(f) for f in forests)
    b = len(forests)
    input_ids = torch.full((b, t), pad_id, dtype=torch.long)
    position_ids = torch.zeros((b, t), dtype=torch.long)
    mask = torch.eye(t, dtype=torch.bool).repeat(b, 1, 1)
    for i, f in enumerate(forests):
        n = len(f)
        input_ids[i, :n] = f.input_ids
        position_ids[i, :n] = f.position_ids
        mask[i, :n, :n] = f.allowed()
    return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": mask[:, None]}


def visibility_mask(first: torch.Tensor, end: torch.Tensor, q_len: int) -> torch.Tensor:
    """Dense (q_len, kv_len) boolean mask where key k is seen by the queries first[k] <= q < end[k]."""
    q = torch.arange(q_len, device=first.device)[:, None]
    return (first[None, :] <= q) & (q < end[None, :])


def visibility_block_mask(first: torch.Tensor, end: torch.Tensor, q_len: int, block: int = 128):
    """The same mask as a FlexAttention `BlockMask`, built from per-block bounds in
    O(blocks^2) rather than by evaluating every (query, key) pair (at 16k tokens that took
    seconds per pass on CPU). A block pair is skipped when no key of the block can be seen by
    any query of the other, full when every key is seen by every query, else masked per token."""
    from torch.nn.attention.flex_attention import BlockMask

    kv_len = len(first)
    n_q, n_kv = -(-q_len // block), -(-kv_len // block)
    pad = n_kv * block - kv_len
    first = torch.nn.functional.pad(first, (0, pad), value=q_len)  # padding keys: seen by nobody
    end = torch.nn.functional.pad(end, (0, pad), value=0)
    f, e = first.view(n_kv, block), end.view(n_kv, block)
    q_start = torch.arange(n_q, device=first.device)[:, None] * block
    q_stop = torch.clamp(q_start + block, max=q_len)
    seen = (f.min(1).values[None] < q_stop) & (e.max(1).values[None] > q_start)
    full = (f.max(1).values[None] <= q_start) & (e.min(1).values[None] >= q_stop)

    def blocks(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        order = torch.argsort(m.to(torch.int8), dim=1, descending=True, stable=True)
        return m.sum(1).to(torch.int32)[None, None], order.to(torch.int32)[None, None]

    return BlockMask.from_kv_blocks(
        *blocks(seen & ~full),
        *blocks(full),
        BLOCK_SIZE=block,
        mask_mod=lambda b, h, q, k: (first[k] <= q) & (q < end[k]),
        seq_lengths=(q_len, kv_len),
    )


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask -> additive float mask, which every attention implementation accepts."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def branch_logits(
    model, forests: list[PackedForest], pad_id: int, shared: list[int] | None = None
) -> list[torch.Tensor]:
    """Next-token logits at the end of every branch, one (n_branches, vocab) tensor per forest
    (a dense-mask batch: what training uses).

    `shared`: tokens every forest starts with (the forests are laid out after them, with
    `position_offset=len(shared)`). They run once, without gradient, and every forest attends
    to their keys and values: training then pays for the tokens that differ, and learns to read
    past the shared prefix rather than to change it.
    """
    from transformers import DynamicCache

    param = next(model.parameters())
    batch = {k: v.to(param.device) for k, v in collate(forests, pad_id).items()}
    cache = None
    if shared:
        cache = DynamicCache()
        with torch.no_grad():
            model.model(input_ids=torch.tensor([shared], device=param.device), past_key_values=cache)
        b = len(forests)
        cache = DynamicCache(
            ddp_cache_data=[
                (layer.keys.expand(b, -1, -1, -1), layer.values.expand(b, -1, -1, -1)) for layer in cache.layers
            ]
        )
        seen = torch.ones((*batch["attention_mask"].shape[:-1], len(shared)), dtype=torch.bool, device=param.device)
        batch["attention_mask"] = torch.cat([seen, batch["attention_mask"]], dim=-1)
    batch["attention_mask"] = additive_mask(batch["attention_mask"], param.dtype)
    hidden = model.model(**batch, past_key_values=cache).last_hidden_state
    return [model.lm_head(hidden[i, f.last.to(param.device)]) for i, f in enumerate(forests)]
