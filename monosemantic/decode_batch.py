"""Continuous batching of generations: one forward per decode step for every running Generation, each row steered,
read and sampled as it would be alone.

Rows join after their prompt has run alone (a prefill is a forward over many positions, which batching buys little
on a CPU) and leave when they finish or their caller goes. The KV cache is one padded tensor per layer,
[rows, heads, length, head_dim], left-padded so every row's newest position is the last column; a 2-D attention
mask hides the padding and each row's position ids are its own. That is the layout the model's own batched
`generate` uses, so every architecture whose cache is transformers' plain DynamicCache batches without an
attention kernel of ours; a paged cache (vLLM's) needs such a kernel, and on this CPU the copy of a padded cache
per step is small beside the forward (bench/RESULTS.md, "Generation batched across requests"); a position is
written into spare room in the buffer (_GrowingLayer), not appended by concatenating the whole cache. A model whose cache
is anything else (sliding-window layers, Gemma-2's) steps its rows one forward each, in the same call.

Each hook's replacement splits the batch into rows and gives every row its own Generation's replacement, so
`clamp` encodes through that row's own dictionaries and rows with different steering (or none) never see each
other's; the reader's features are encoded for all rows of one dictionary at once after the forward.
"""

from __future__ import annotations

import copy
from contextlib import ExitStack
from typing import Callable, Hashable, NamedTuple

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache, DynamicLayer

from monosemantic.generation import Generation, StepResult, cache_kwarg, strongest
from monosemantic.sampling import sample_rows
from monosemantic.lm import HookPoint, hooked_replacement


class RowResult(NamedTuple):
    """One row's outcome of a step: its StepResult, or the error that ended it (the other rows go on)."""

    generation: Generation
    result: StepResult | None
    error: BaseException | None


class Forwarded(NamedTuple):
    """A step between its halves (DecodeBatch.forward, then .finish)."""

    done: list[RowResult]  # the rows already stepped whole (alone)
    seens: list | None  # the batched rows' records of their hooks; None: no batched row
    logits: Tensor | None  # [rows, vocab] at each batched row's new position


def batchable(cache: object) -> bool:
    """A cache whose layers are all plain growing key/value tensors: rows of it can be padded and stacked."""
    return type(cache) is DynamicCache and all(type(layer) is DynamicLayer for layer in cache.layers)


def _left_pad(t: Tensor, length: int) -> Tensor:
    """[rows, heads, L, dh] padded with zeros on the left of the sequence axis to `length`."""
    missing = length - t.shape[-2]
    if missing == 0:
        return t
    return torch.cat([t.new_zeros(*t.shape[:-2], missing, t.shape[-1]), t], dim=-2)


class _GrowingLayer(DynamicLayer):
    """A batch's keys and values for one layer in buffers with room to grow: a step writes its position into the
    spare room, where DynamicLayer concatenates the whole cache every step (26% of a step at GPT-2's shape with 32
    rows of ~600 positions). The buffer doubles when full, so each position is copied O(1) times on average, and
    never holds more than `limit` positions (the model's context: no row grows past it) unless it must."""

    def __init__(self, keys: Tensor, values: Tensor, limit: int) -> None:
        super().__init__()
        self.is_initialized, self.device, self._limit = True, keys.device, limit
        self._grow_to(keys, values)

    def _grow_to(self, keys: Tensor, values: Tensor) -> None:
        length = keys.shape[-2]
        capacity = max(length + 1, min(2 * length + 16, self._limit))
        self._keys = keys.new_empty(*keys.shape[:-2], capacity, keys.shape[-1])
        self._values = values.new_empty(*values.shape[:-2], capacity, values.shape[-1])
        self._keys[..., :length, :] = keys
        self._values[..., :length, :] = values
        self._length = length
        self.keys, self.values = self._keys[..., :length, :], self._values[..., :length, :]

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        new = key_states.shape[-2]
        if self._length + new > self._keys.shape[-2]:
            self._grow_to(self.keys, self.values)
        end = self._length + new
        self._keys[..., self._length:end, :] = key_states
        self._values[..., self._length:end, :] = value_states
        self._length = end
        self.keys, self.values = self._keys[..., :end, :], self._values[..., :end, :]
        return self.keys, self.values


def _plain(keys: Tensor, values: Tensor) -> DynamicLayer:
    """A lone generation's layer of its own (a copy: a view would keep the whole batch's buffer alive)."""
    layer = DynamicLayer()
    layer.is_initialized, layer.device = True, keys.device
    layer.keys, layer.values = keys.clone(), values.clone()
    return layer


class DecodeBatch:
    """The running rows of one model and their padded cache. Not thread-safe: one caller (the service's worker)."""

    def __init__(self, padded: bool = True) -> None:
        """padded=False: every row steps its own forward (batching off), in the one call to `step`."""
        self.padded = padded
        self.rows: list[Generation] = []
        self._cache: DynamicCache | None = None
        self._mask: Tensor | None = None  # [rows, length] long: 1 where a row has a real position
        self._alone: list[Generation] = []  # rows whose cache cannot be batched: each steps its own forward
        # A lone row steps with its own cache, as a generation outside any batch does (a padded batch of one
        # measured 630 tokens/s against 654 alone on the reference); it is merged in when a second row joins.
        self._solo: Generation | None = None

    def __len__(self) -> int:
        return len(self.generations)

    @property
    def generations(self) -> list[Generation]:
        return self.rows + self._alone + ([self._solo] if self._solo is not None else [])

    def join(self, generation: Generation) -> None:
        """Take a prefilled generation's cache into the batch (it steps here from now on)."""
        if not generation.prefilled or generation.done:
            raise ValueError("a generation joins a DecodeBatch after its first step and before its last")
        if not (self.padded and batchable(generation.own_cache)):
            self._alone.append(generation)
        elif not self.rows and self._solo is None:
            self._solo = generation
        else:
            if self._solo is not None:
                solo, self._solo = self._solo, None
                self._merge(solo)
            self._merge(generation)

    def _merge(self, generation: Generation) -> None:
        """Its cache into the padded one, left-padding whichever is shorter."""
        cache = generation.hand_over_cache()
        mask = torch.ones((1, cache.layers[0].keys.shape[-2]), dtype=torch.long, device=cache.layers[0].keys.device)
        if self._cache is None:
            self._cache, self._mask = cache, mask
            cache.layers = [_GrowingLayer(layer.keys, layer.values, generation.model.max_positions) for layer in cache.layers]
        else:
            length = max(self._mask.shape[1], mask.shape[1])
            self._cache.layers = [
                _GrowingLayer(torch.cat([_left_pad(mine.keys, length), _left_pad(theirs.keys, length)]),
                              torch.cat([_left_pad(mine.values, length), _left_pad(theirs.values, length)]), generation.model.max_positions)
                for mine, theirs in zip(self._cache.layers, cache.layers)]
            self._mask = torch.cat([_left_pad(self._mask[..., None], length), _left_pad(mask[..., None], length)])[..., 0]
        self.rows.append(generation)

    def leave(self, gone: set[int]) -> None:
        """Drop the rows whose id() is in `gone` (finished, failed, abandoned), and the padding no row needs now."""
        self._alone = [g for g in self._alone if id(g) not in gone]
        if self._solo is not None and id(self._solo) in gone:
            self._solo = None
        keep = [i for i, g in enumerate(self.rows) if id(g) not in gone]
        if len(keep) == len(self.rows):
            return
        for i, g in enumerate(self.rows):
            if id(g) in gone:
                g.take_back_cache(None)
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self._cache = self._mask = None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self._mask.device)
        mask = self._mask.index_select(0, index)
        start = int(mask.any(0).long().argmax())  # the first column some row still uses
        self._mask = mask[:, start:]
        limit = self.rows[0].model.max_positions
        self._cache.layers = [_GrowingLayer(layer.keys.index_select(0, index)[:, :, start:], layer.values.index_select(0, index)[:, :, start:], limit)
                              for layer in self._cache.layers]
        if len(self.rows) == 1 and self._solo is None:
            self._solo = self._unbatch()[0]

    def step(self) -> list[RowResult]:
        """One decode step for every row: one forward for the batched rows, one each for the others."""
        return self.finish(self.forward())

    def forward(self) -> "Forwarded":
        """A step's first half: the forward (the rows stepped alone, whole). A caller that interleaves other work
        with the batch (the service's worker) runs the halves as separate jobs; no row joins or leaves between."""
        done = [self._one(g) for g in self._alone + ([self._solo] if self._solo is not None else [])]
        if not self.rows:
            return Forwarded(done, None, None)
        before = [(layer.keys, layer.values) for layer in self._cache.layers], self._mask
        try:
            seens, logits = self._forward_rows()
        except Exception:
            # A forward that raised for the batch (one row's hook refusing its steering) is retried row by row
            # from the cache as it was (the positions before this step; the layers that ran wrote past them), so
            # the error reaches only the rows it belongs to.
            for layer, (keys, values) in zip(self._cache.layers, before[0]):
                layer.keys, layer.values = keys, values
            self._mask = before[1]
            moved = self._unbatch()
            self._alone.extend(moved)
            return Forwarded(done + [self._one(g) for g in moved], None, None)
        return Forwarded(done, seens, logits)

    def finish(self, forwarded: "Forwarded") -> list[RowResult]:
        """A step's second half: every batched row checked, sampled and its step result made."""
        if forwarded.seens is None:
            return forwarded.done
        return forwarded.done + self._conclude_rows(forwarded.seens, forwarded.logits)

    def _unbatch(self) -> list[Generation]:
        """Give every batched row its own cache again (its real positions), out of the batch."""
        moved = self.rows
        for row, generation in enumerate(moved):
            start = int(self._mask[row].argmax())  # left-padded: its real positions are a suffix
            cache = copy.copy(self._cache)
            cache.layers = [_plain(layer.keys[row:row + 1, :, start:], layer.values[row:row + 1, :, start:]) for layer in self._cache.layers]
            generation.take_back_cache(cache)
        self.rows, self._cache, self._mask = [], None, None
        return moved

    @staticmethod
    def _one(generation: Generation) -> RowResult:
        try:
            return RowResult(generation, generation.step(), None)
        except Exception as exc:  # this row's failure (a non-finite steered output) is its own
            return RowResult(generation, None, exc)

    def _forward_rows(self) -> tuple[list, Tensor]:
        net = self.rows[0].model.lm.model
        device = self._mask.device
        prepared = [g.prepare() for g in self.rows]
        ids = torch.tensor([p[0] for p in prepared], dtype=torch.long, device=device)
        positions = torch.tensor([[g.position] for g in self.rows], dtype=torch.long, device=device)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(self.rows), 1))], dim=1)
        seens = [p[1] for p in prepared]
        groups: dict[Hashable, list[int]] = {}  # rows that steer alike share one set of hooks, run on all of them at once
        for row, (generation, seen) in enumerate(zip(self.rows, seens)):
            groups.setdefault(generation.signature(seen.steered_here), []).append(row)
        by_key: dict[str, tuple[HookPoint, list[tuple[list[int], Callable[[Tensor], Tensor]]]]] = {}
        for rows in groups.values():
            for point, replace in self.rows[rows[0]].hooks([seens[r] for r in rows]):
                by_key.setdefault(point.key, (point, []))[1].append((rows, replace))
        cache_name = cache_kwarg(net)
        with torch.inference_mode(), ExitStack() as hooks:
            for point, replaces in by_key.values():
                hooks.enter_context(hooked_replacement(net, point, _by_group(replaces, len(self.rows))))
            out = net(input_ids=ids, attention_mask=self._mask, position_ids=positions, use_cache=True,
                      **{cache_name: self._cache})
        self._cache = out[cache_name]
        self._read_together(seens)
        return seens, out.logits[:, -1]

    def _conclude_rows(self, seens: list, logits: Tensor) -> list[RowResult]:
        finite = torch.isfinite(logits).all(1).tolist()
        failed: dict[int, BaseException] = {}
        for row, generation in enumerate(self.rows):
            try:
                generation.check(logits[row], seens[row], finite[row])
            except Exception as exc:
                failed[row] = exc
        self._rank_together(seens, [r for r in range(len(self.rows)) if r not in failed])
        sampled = [r for r in range(len(self.rows)) if r not in failed]
        rows = [self.rows[r] for r in sampled]
        tokens = dict(zip(sampled, sample_rows(
            logits if len(sampled) == len(self.rows) else logits[sampled], [g.cfg for g in rows], [g.generator for g in rows],
            [g.penalty_counts(logits.shape[-1], logits.device) for g in rows])))
        results = []
        for row, generation in enumerate(self.rows):
            if row in failed:
                results.append(RowResult(generation, None, failed[row]))
                continue
            try:
                results.append(RowResult(generation, generation.conclude(logits[row], seens[row], finite[row], tokens[row]), None))
            except Exception as exc:
                results.append(RowResult(generation, None, exc))
        return results

    def _read_together(self, seens: list) -> None:
        """Encode the reader's features of every row that reads one dictionary in one call (their rows stacked)."""
        groups: dict[int, list[int]] = {}
        for row, seen in enumerate(seens):
            if seen.features is None:
                groups.setdefault(id(self.rows[row].reader), []).append(row)
        for rows in groups.values():
            if len(rows) < 2:
                continue  # one row: Generation.conclude's matvec
            features = self.rows[rows[0]].reader.sae.encode(torch.stack([seens[r].read_input for r in rows]))
            for r, f in zip(rows, features):
                seens[r].features = f

    def _rank_together(self, seens: list, rows: list[int]) -> None:
        """Each row's strongest features, one topk for the rows of one reader and one k."""
        groups: dict[tuple[int, int], list[int]] = {}
        for r in rows:
            if seens[r].features is not None:
                groups.setdefault((id(self.rows[r].reader), self.rows[r].cfg.features_top_k), []).append(r)
        for (_, k), members in groups.items():
            for r, top in zip(members, strongest(torch.stack([seens[m].features for m in members]), k)):
                seens[r].top = top


def _by_group(groups: list[tuple[list[int], Callable[[Tensor], Tensor]]], rows: int) -> Callable[[Tensor], Tensor]:
    """A hook's replacement for the whole batch: each group of rows through its own replacement (on those rows
    stacked), the rows of no group as they are."""
    if len(groups) == 1 and len(groups[0][0]) == rows:
        return groups[0][1]  # every row steers alike: no split

    def replace(x: Tensor) -> Tensor:
        parts = [(torch.tensor(group, device=x.device), fn(x[group])) for group, fn in groups]
        dtype = x.dtype
        for _, part in parts:
            dtype = torch.promote_types(dtype, part.dtype)
        out = x.to(dtype, copy=True)
        for index, part in parts:
            out.index_copy_(0, index, part.to(out.dtype))
        return out
    return replace


def run_together(generations: list[Generation]) -> dict[int, BaseException]:
    """Every generation to its end in one DecodeBatch (a notebook's or an evaluation's many rows; the service feeds
    its batch itself, service/decoder.py): each prefilled alone, then stepped with the others. Returns the errors
    that ended rows early, by the failed generation's id()."""
    batch, failed = DecodeBatch(), {}
    for g in generations:
        try:
            g.step()
        except Exception as exc:  # its own failure (a non-finite steered prompt); the others go on
            failed[id(g)] = exc
            continue
        if not g.done:
            batch.join(g)
    while len(batch):
        gone = set()
        for outcome in batch.step():
            if outcome.error is not None:
                failed[id(outcome.generation)] = outcome.error
            if outcome.error is not None or outcome.generation.done:
                gone.add(id(outcome.generation))
        batch.leave(gone)
    return failed
