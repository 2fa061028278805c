"""Attention that stays inside each example of a packed row, without a T x T mask.

A packed row holds several examples side by side; each must attend only to itself, causally, as if it
were alone. A dense block-diagonal mask (B, 1, T, T) does that at a cost quadratic in the row: at 2,048
tokens it is 4M booleans a row, and PyTorch's masked SDPA on CPU also materializes the (B, H, T, T)
scores. Here every example (a *segment*: a run of equal segment ids in a row) is attended on its own:

- spans are grouped by their length rounded up to a multiple of `granule` (a *bucket*), so a batch of
  examples of ~40 different lengths costs ~3 attention calls per layer, not 40;
- for a bucket of length L, the query/key/value positions start..start+L-1 of each of its spans are
  gathered into (N, H, L, D) and run through causal SDPA (flash attention on CPU and CUDA, memory linear
  in L). A span shorter than L borrows the positions after it (the next example, or clamped padding):
  under the causal mask no real query sees a later key, so those positions change nothing; their
  outputs are simply not read back;
- one index gathers every real position's output back into (B, H, T, D); padding (segment id < 0)
  gets zeros (it has no target and no later token reads it).

So memory is linear in the row (bounded by the longest example squared at worst), and the result equals
the masked path's up to float summation order (tested: loss and gradients). Positions restarting per
example are the caller's business (the rows carry them), as with the mask.

Build a `Segments` once per batch (`Segments.from_ids`), pass it to `Transformer(..., segments=...)`;
every layer reuses its indices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

GRANULE = 16
"""Bucket width: spans are padded (causally, at no effect on the result) to a multiple of this length.
Larger: fewer SDPA calls; smaller: less wasted arithmetic. 16 keeps the waste under ~20% for ~40-token
examples and the calls to a handful."""


@dataclass(frozen=True, slots=True)
class Segments:
    """Where the examples of a (B, T) batch lie, precomputed as gather indices per length bucket.

    groups: one (L, index (N, L)) per bucket: flat positions b * T + t of the N spans' first L tokens.
    output_index: (B * T,) for each flat position, its row in the concatenated bucket outputs (N * L
    rows per bucket, in order), or the last row (a zero row) for padding.
    """

    shape: tuple[int, int]
    groups: tuple[tuple[int, torch.Tensor], ...]
    output_index: torch.Tensor
    lengths: torch.Tensor
    """(S,) length of every span, in row-major order (for callers that sum per example)."""
    span_of: torch.Tensor
    """(B, T) index of the span each position belongs to, -1 for padding."""

    @classmethod
    def from_ids(cls, segment_ids: torch.Tensor, granule: int = GRANULE) -> Segments:
        """From (B, T) segment ids: a run of equal ids within a row is one example; ids < 0 are padding.

        Ids need not be unique across rows, only different from their neighbours within a row."""
        B, T = segment_ids.shape
        device = segment_ids.device
        ids = segment_ids.detach().to("cpu", torch.long)
        flat = ids.reshape(-1)
        starts_mask = torch.ones(B * T, dtype=torch.bool)
        starts_mask[1:] = flat[1:] != flat[:-1]
        starts_mask[::T] = True  # every row begins a run
        starts = starts_mask.nonzero().squeeze(1)  # (R,) flat start of each run
        ends = torch.cat([starts[1:], torch.tensor([B * T])])
        real = flat[starts] >= 0
        starts, lengths = starts[real], (ends - starts)[real]
        span_of = torch.full((B * T,), -1, dtype=torch.long)
        run_id = torch.cumsum(starts_mask.long(), 0) - 1  # run of every position
        real_run = torch.full((int(starts_mask.sum()),), -1, dtype=torch.long)
        real_run[real.nonzero().squeeze(1)] = torch.arange(int(real.sum()))
        span_of = real_run[run_id]

        buckets = -(-lengths // granule) * granule
        output_index = torch.full((B * T,), -1, dtype=torch.long)
        groups = []
        offset = 0
        for L in sorted(set(buckets.tolist())):
            chosen = (buckets == L).nonzero().squeeze(1)
            span_starts, span_lengths = starts[chosen], lengths[chosen]
            index = span_starts[:, None] + torch.arange(L)[None, :]  # (N, L)
            n = len(chosen)
            within = torch.arange(L)[None, :] < span_lengths[:, None]
            output_index[index[within]] = offset + torch.arange(n * L).reshape(n, L)[within]
            groups.append((L, index.clamp(max=B * T - 1).to(device)))
            offset += n * L
        output_index[output_index < 0] = offset  # padding: the zero row appended after the buckets
        return cls((B, T), tuple(groups), output_index.to(device), lengths.to(device),
                   span_of.reshape(B, T).to(device))

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  dropout_p: float = 0.0) -> torch.Tensor:
        """Causal attention within each span. q: (B, H, T, D); k, v: (B, Hkv, T, D) -> (B, H, T, D)."""
        B, H, T, D = q.shape
        if (B, T) != self.shape:
            raise ValueError(f"segments describe a {self.shape} batch, attention got ({B}, {T})")
        gqa = H != k.shape[1]
        qf = q.transpose(1, 2).reshape(B * T, H, D)  # (B*T, H, D): one gather per bucket
        kf = k.transpose(1, 2).reshape(B * T, -1, D)
        vf = v.transpose(1, 2).reshape(B * T, -1, D)
        outputs = []
        for _length, index in self.groups:
            flat = index.reshape(-1)
            qg = qf.index_select(0, flat).unflatten(0, index.shape).transpose(1, 2)  # (N, H, L, D)
            kg = kf.index_select(0, flat).unflatten(0, index.shape).transpose(1, 2)  # (N, Hkv, L, D)
            vg = vf.index_select(0, flat).unflatten(0, index.shape).transpose(1, 2)
            y = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, dropout_p=dropout_p, enable_gqa=gqa)
            outputs.append(y.transpose(1, 2).reshape(-1, H, D))  # (N*L, H, D)
        outputs.append(q.new_zeros(1, H, D))
        out = torch.cat(outputs).index_select(0, self.output_index)  # (B*T, H, D)
        return out.view(B, T, H, D).transpose(1, 2)

    def sum_per_span(self, values: torch.Tensor) -> torch.Tensor:
        """(B, T) per-position values -> (S,) sums over each span (padding ignored), in span order."""
        keep = self.span_of >= 0
        out = values.new_zeros(len(self.lengths))
        return out.index_add(0, self.span_of[keep], values[keep])


def segment_ids_from_lengths(lengths: list[int]) -> torch.Tensor:
    """(1, sum(lengths)) ids 0, 0, .., 1, 1, ..: sequences laid end to end in one row."""
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
