"""DPO training examples for the two AlignXpert methods (paper §5, Appendix B, C.2).

From one AlignX row: 0–4 UGC and 0–4 PAIR items are sampled (when both come out 0, 4 of
each, as far as the row has them), seeded by the example id, so every epoch, worker and
resumed run sees the same prompts.
- ICA: the task and the behaviour history (UGC items, PAIR items, demographic text) in
  context (Appendix B.2).
- PBA: the task and P~, the description of aggregate_directions over the sampled items'
  directions (Appendix B.1). The demographic text has no direction in the released data, so
  P~ is built from the behavioural items alone.
Both are rendered with the policy model's chat template; chosen / rejected are the responses.
With `reversal_copies`, each example is followed by its reversal (`reversed_example`), the
evaluation's Table 5 construction, so the persona, not the response, decides the preference.

`prepare_training_data` renders a dataset once, on Ray Data, into parquet parts that keep the
dataset's row order; the Ray Train workers and the fit accuracy read those parts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from alignx_ray.common import prompts, schema
from alignx_ray.common.config import resolve_local
from alignx_ray.common.raydata import actor_pool_args
from alignx_ray.common.seeding import seeded_rng
from alignx_ray.common.space import SPACE, PreferenceSpace, flip_direction
from alignx_ray.train.dpo_config import TrainConfig

Method = Literal["ica", "pba"]
MAX_ITEMS = 4
DPO_SCHEMA = pa.schema([(name, pa.string()) for name in ("prompt", "chosen", "rejected", "example_id")])


def sample_items(row: dict, seed: int) -> tuple[list[dict], list[dict]]:
    """(UGC items, PAIR items) for one example: 0–4 of each, 4 of each when both draw 0."""
    rng = seeded_rng("dpo-items", seed, row["example_id"])
    ugc, pairs = row[schema.UGC] or [], row[schema.PAIR] or []
    n_ugc, n_pair = (int(rng.integers(0, MAX_ITEMS + 1)) for _ in range(2))
    if n_ugc == n_pair == 0:
        n_ugc = n_pair = MAX_ITEMS
    pick = lambda items, n: [items[i] for i in sorted(rng.permutation(len(items))[:n])]  # noqa: E731
    return pick(ugc, n_ugc), pick(pairs, n_pair)


def profile_text(ugc: list[dict], pairs: list[dict], space: PreferenceSpace = SPACE) -> str:
    """P~ (Appendix B.1): the sampled items' directions aggregated and described."""
    vectors = [item[schema.DIRECTION] for item in ugc + pairs]
    if not vectors:
        return ""
    return space.describe_direction(space.aggregate_directions(vectors))


def render(
    row: dict,
    ugc: list[dict],
    pairs: list[dict],
    method: Method,
    tokenizer,
    templates: prompts.PromptTemplates,
    space: PreferenceSpace = SPACE,
) -> dict:
    """{prompt, chosen, rejected, example_id}: `row`'s target with these persona items in the
    format of `method`."""
    if method == "ica":
        prompt = prompts.ica_prompt(
            tokenizer, templates, row[schema.PROMPT], ugc, pairs, row.get(schema.DEMOGRAPHIC) or ""
        )
    elif method == "pba":
        prompt = prompts.pba_prompt(tokenizer, templates, row[schema.PROMPT], profile_text(ugc, pairs, space))
    else:
        raise ValueError(f"unknown method {method!r}: use 'ica' or 'pba'")
    return {
        "prompt": prompt,
        "chosen": row[schema.CHOSEN],
        "rejected": row[schema.REJECTED],
        "example_id": row["example_id"],
    }


def dpo_example(
    row: dict,
    method: Method,
    tokenizer,
    templates: prompts.PromptTemplates,
    seed: int = 0,
    space: PreferenceSpace = SPACE,
) -> dict:
    """{prompt, chosen, rejected, example_id} in the format of `method`."""
    ugc, pairs = sample_items(row, seed)
    return render(row, ugc, pairs, method, tokenizer, templates, space)


def reversed_example(
    row: dict, pairs: list[dict], method: Method, tokenizer, templates: prompts.PromptTemplates, space=SPACE
) -> dict | None:
    """The example of `row` with these sampled PAIR items, its preferences reversed (Table 5):
    chosen and rejected swapped in the target and in every PAIR item, the items' directions
    flipped, UGC comments and the demographic text left out (they cannot be reversed).
    None without PAIR items; the id ends in `|reversed`."""
    if not pairs:
        return None
    swapped = [
        {
            **p,
            schema.CHOSEN: p[schema.REJECTED],
            schema.REJECTED: p[schema.CHOSEN],
            schema.DIRECTION: flip_direction(p[schema.DIRECTION]),
        }
        for p in pairs
    ]
    target = {
        **row,
        schema.CHOSEN: row[schema.REJECTED],
        schema.REJECTED: row[schema.CHOSEN],
        schema.DEMOGRAPHIC: "",
        "example_id": f"{row['example_id']}|reversed",
    }
    return render(target, [], swapped, method, tokenizer, templates, space)


def dpo_batch(
    table: pa.Table,
    method: Method,
    tokenizer,
    templates: prompts.PromptTemplates,
    seed: int = 0,
    space: PreferenceSpace = SPACE,
    reversal_copies: bool = False,
) -> pa.Table:
    """`dpo_example` of every row of an AlignX-schema table, in its order (`DPO_SCHEMA`), each
    followed by its `reversed_example` (where it has one) with `reversal_copies`."""
    rows = []
    for row in table.to_pylist():
        ugc, pairs = sample_items(row, seed)
        rows.append(render(row, ugc, pairs, method, tokenizer, templates, space))
        if reversal_copies and (flip := reversed_example(row, pairs, method, tokenizer, templates, space)):
            rows.append(flip)
    return pa.Table.from_pylist(rows, DPO_SCHEMA)


def parquet_pieces(dataset: str, limit: int | None = None) -> tuple[list[dict], pafs.FileSystem]:
    """(the row groups of a parquet file or folder in `pq.read_table`'s order, its filesystem).

    Each piece has its part number, path, row group, the number of its first row in the whole
    dataset (the released data's ids are row numbers) and its rows, the last one cut so the
    pieces hold the first `limit` rows. Read from the files' footers only.
    """
    parquet = pq.ParquetDataset(dataset)
    pieces, first = [], 0
    for fragment in parquet.fragments:
        metadata = fragment.metadata
        for group in range(metadata.num_row_groups):
            if limit is not None and first >= limit:
                return pieces, parquet.filesystem
            rows = metadata.row_group(group).num_rows
            rows = rows if limit is None else min(rows, limit - first)
            if rows:
                piece = {"part": len(pieces), "path": fragment.path, "row_group": group, "first_row": first}
                pieces.append({**piece, "rows": rows})
                first += rows
    return pieces, parquet.filesystem


def part_path(out_dir: Path, part: int) -> Path:
    return out_dir / f"part-{part:06d}.parquet"


def prepared_parts(out_dir: str | Path) -> list[str]:
    """The prepared parquet parts in the dataset's order."""
    return sorted(str(p) for p in Path(out_dir).glob("part-*.parquet"))


def prepared_head(out_dir: str | Path, n: int) -> pa.Table:
    """The first n prepared examples (only the parts that hold them are read)."""
    return pads.dataset(prepared_parts(out_dir), format="parquet").head(n)


class Renderer:
    """Ray Data actor: loads the tokenizer once, then renders row groups, one part file each."""

    def __init__(
        self,
        filesystem,
        method: Method,
        tokenizer: str,
        templates: dict,
        seed: int,
        reversal_copies: bool,
        out_dir: str,
    ):
        from transformers import AutoTokenizer

        self.filesystem, self.method, self.seed, self.out_dir = filesystem, method, seed, Path(out_dir)
        self.reversal_copies = reversal_copies
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.templates = prompts.PromptTemplates(**templates)

    def __call__(self, pieces: pa.Table) -> pa.Table:
        for piece in pieces.to_pylist():
            source = pq.ParquetFile(piece["path"], filesystem=self.filesystem)
            table = schema.to_official(
                source.read_row_group(piece["row_group"]).slice(0, piece["rows"]), first_row=piece["first_row"]
            )
            rendered = dpo_batch(
                table, self.method, self.tokenizer, self.templates, self.seed, reversal_copies=self.reversal_copies
            )
            target = part_path(self.out_dir, piece["part"])
            partial = target.with_name(f".{target.name}.tmp")
            pq.write_table(rendered, partial)
            os.replace(partial, target)  # a killed call leaves no part behind
        return pieces.select(["part", "rows"])


def prepare_training_data(
    config: TrainConfig, dataset: str, tokenizer_path: str, templates: prompts.PromptTemplates, out_dir: Path
) -> dict:
    """Render the DPO examples of `dataset` (an AlignX parquet file or folder, ours or the
    released one; the first `config.max_examples` rows) into `out_dir/part-NNNNNN.parquet`.

    One part per row group, named by its place in the dataset, so the parts read in name order
    are the dataset's rows in order (the examples `dpo_example` gives row by row), and a killed
    preparation resumes with the parts it has not written. The driver reads the footers only;
    an actor pool (`config.prepare`) reads, validates (`to_official`) and renders the rows.
    Returns {"rows" (read), "examples" (rendered: more than the rows with `reversal_copies`),
    "parts"}.
    """
    import ray.data

    pieces, filesystem = parquet_pieces(resolve_local(dataset), config.max_examples)
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [p for p in pieces if not part_path(out_dir, p["part"]).exists()]
    if todo:
        ray.data.from_items(todo).map_batches(
            Renderer,
            fn_constructor_kwargs={
                "filesystem": filesystem,
                "method": config.method,
                "tokenizer": resolve_local(tokenizer_path),
                "templates": templates.model_dump(),
                "seed": config.dpo.seed,
                "reversal_copies": config.reversal_copies,
                "out_dir": str(out_dir),
            },
            batch_format="pyarrow",
            **actor_pool_args(config.prepare),
        ).materialize()
    examples = sum(pq.read_metadata(part_path(out_dir, p["part"])).num_rows for p in pieces)  # footers only
    return {"rows": sum(p["rows"] for p in pieces), "examples": examples, "parts": len(pieces)}
