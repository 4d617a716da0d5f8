"""Atoms <-> tokens by index on the mesh, never through the dense one-hot atom_to_token [M, N].

Atoms are sharded by window over all P ranks (boltz_cp/modules/atom_windows.py); tokens by
SINGLE_FULL block (rank q holds tokens [q*n_f, (q+1)*n_f), n_f = N/P). Each rank's atoms map
to the token span ``spans[q] = (lo, hi)`` (from `embedder_inputs`), which may straddle blocks.

- `token_means`: upstream's bmm(atom_to_token_mean^T, x): partial sums of my atoms over my
  span, one `span_reduce` onto the SINGLE_FULL owners, then / (atoms per token + 1e-6).
- `token_rows_to_atoms`: upstream's bmm(atom_to_token, x): the SINGLE_FULL owners' rows of my
  span through one `span_gather`, then a gather by each atom's token index (zeros for atoms of
  no token, as the zero row of the one-hot).

Placements: per-atom tensors are my local atoms [B', L, C]; per-token tensors my SINGLE_FULL
block [B', n_f, C]. B' may be B*multiplicity: index tensors are then repeated along the batch
(upstream's repeat_interleave), spans are the union over the batch.
Communication per call: `token_means` 1 span_reduce (about len(span)*C elements sent per
rank); `token_rows_to_atoms` 1 span_gather (about len(span)*C elements received per rank;
boltz_cp/distributed/span.py).
Upstream twin: boltz/model/modules/encodersv2.py AtomAttentionEncoder / AtomAttentionDecoder
(the atom_to_token bmm's).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from boltz_cp.distributed.halo import span_reduce
from boltz_cp.distributed.mesh import CPMesh
from boltz_cp.distributed.span import span_gather


def token_means(values: Tensor, atom_token: Tensor, spans: Sequence[tuple[int, int]],
                atom_count: Tensor, mesh: CPMesh) -> Tensor:
    """Mean of ``values`` [B', L, C] over each token's atoms -> my SINGLE_FULL block [B', n_f, C].

    atom_token [B', L] long (-1: no token), atom_count [B', n_f] (atoms per token of my block).
    Computes in ``values``' dtype (callers promote first).
    """
    lo, hi = spans[mesh.local_rank]
    # Row hi - lo collects the atoms of no token and is dropped.
    local = torch.where(atom_token >= 0, atom_token - lo, hi - lo)
    partial = values.new_zeros(values.shape[0], hi - lo + 1, values.shape[-1])
    partial.scatter_add_(1, local.unsqueeze(-1).expand_as(values), values)
    sums = span_reduce(partial[:, :hi - lo], spans, mesh, atom_count.shape[1]).wait()
    # NOTE(parity): sum then divide; upstream weights each atom by 1/(count + 1e-6) inside its
    # bmm (round-off only).
    return sums / (atom_count.to(values.dtype).unsqueeze(-1) + 1e-6)


def token_rows_to_atoms(block_rows: Tensor, atom_token: Tensor, spans: Sequence[tuple[int, int]],
                        mesh: CPMesh) -> Tensor:
    """Row of each atom's token: my SINGLE_FULL block [B', n_f, C] -> my atoms [B', L, C].

    atom_token [B', L] long (-1: no token -> zeros). Exact copies (the one-hot bmm adds zeros).
    """
    lo, hi = spans[mesh.local_rank]
    rows = span_gather(block_rows, spans, mesh).wait()  # [B', hi - lo, C]
    rows = torch.cat([rows, rows.new_zeros(rows.shape[0], 1, rows.shape[-1])], dim=1)
    local = torch.where(atom_token >= 0, atom_token - lo, hi - lo)
    return torch.gather(rows, 1, local.unsqueeze(-1).expand(-1, -1, rows.shape[-1]))
