"""The 2D context-parallel mesh: axes, rings and rank arithmetic.

Mesh dim 0 is ``cp_i`` (it splits token dim i = pair dim 1, the mesh *rows*); mesh dim 1 is
``cp_j`` (it splits token dim j = pair dim 2, the mesh *cols*). Rank (r, c) = r*cols + c owns
the pair tile z[I_r, J_c].

Rings are named by the axis they run over, never by the DeviceMesh sub-mesh name:
``ring_j`` runs along j over the ranks that share my i-block (my tile row) and is
``device_mesh.get_group("cp_j")``; ``ring_i`` runs along i over the ranks that share my
j-block (my tile column) and is ``device_mesh.get_group("cp_i")``. The group rank of a
member of ``ring_j`` is its column c, of ``ring_i`` its row r.

Any R x C works: square meshes run Cannon's schedules, others the broadcast (SUMMA)
schedules of distributed/summa.py; `Grid` is the mesh as those algorithms see it (as is, or
transposed for algorithms on z^T's tiles). `auto_mesh` picks the most square shape.

Data parallel: ``dp=D`` splits the world into D independent meshes of rows x cols ranks
(world rank = d*rows*cols + r*cols + c); each mesh folds its own inputs, with its own writer
(its tile (0, 0)). ``mesh.rank`` is always the global rank, ``rank_of`` / ``coord_of`` map
inside my mesh, and ``mesh.group`` spans my mesh only.

Building a mesh creates process groups (a collective over the whole world), so every rank
must call `CPMesh.build` with the same arguments. Size errors are raised on every rank
before any collective, so they never hang.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from boltz_cp.errors import ConfigError

MESH_DIM_NAMES = ("cp_i", "cp_j")
DP_DIM_NAME = "dp"


class Ring(str, Enum):
    """A ring of the mesh, by the axis it runs over: RING_J = my tile row, RING_I = my tile column.
    A str, so "i" / "j" compare equal to it; `as_ring` turns any other name into an error."""

    RING_I = "i"
    RING_J = "j"


def as_ring(ring: str | Ring) -> Ring:
    """The `Ring` named by ``ring``; ValueError for anything but "i" / "j" (a typo must not
    silently mean ring_i)."""
    try:
        return Ring(ring)
    except ValueError:
        raise ValueError(f"ring must be 'i' or 'j', got {ring!r}") from None


def auto_mesh(ranks: int) -> tuple[int, int]:
    """The most square rows x cols with rows * cols == ranks and rows <= cols (8 -> 2x4)."""
    if ranks < 1:
        raise ConfigError(f"mesh=auto needs at least one rank, got {ranks}")
    rows = max(d for d in range(1, int(ranks ** 0.5) + 1) if ranks % d == 0)
    return rows, ranks // rows


def parse_mesh(spec: str | tuple[int, int] | list[int]) -> tuple[int, int]:
    """"2x3" / (2, 3) -> (2, 3); anything else raises ConfigError."""
    if isinstance(spec, str):
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", spec)
        if m is None:
            raise ConfigError(f"mesh must look like ROWSxCOLS (e.g. 2x2), got {spec!r}")
        rows, cols = int(m.group(1)), int(m.group(2))
    else:
        try:
            rows, cols = (int(v) for v in spec)
        except (TypeError, ValueError):
            raise ConfigError(f"mesh must be ROWSxCOLS or (rows, cols), got {spec!r}") from None
    if rows < 1 or cols < 1:
        raise ConfigError(f"mesh sides must be positive, got {rows}x{cols}")
    return rows, cols


def convert_rank(group: dist.ProcessGroup, *, global_rank: int | None = None,
                 group_rank: int | None = None) -> int:
    """The one place that maps between global ranks and ranks inside ``group``.

    Give exactly one of ``global_rank`` / ``group_rank``; the other is returned. P2P ops
    take global ranks in ``dst``/``src``/``peer`` but group ranks in ``group_dst``/
    ``group_peer``: convert here, never by hand.
    """
    if (global_rank is None) == (group_rank is None):
        raise TypeError("give exactly one of global_rank / group_rank")
    if global_rank is not None:
        return dist.get_group_rank(group, global_rank)
    return dist.get_global_rank(group, group_rank)


def check_mesh_size(rows: int, cols: int, world: int, dp: int = 1) -> None:
    """ConfigError unless dp meshes of rows x cols use exactly the launched processes (no
    communication)."""
    if dp < 1:
        raise ConfigError(f"dp must be a positive integer, got {dp}")
    if dp * rows * cols != world:
        times = f"{dp} x " if dp > 1 else ""
        raise ConfigError(
            f"{times}mesh {rows}x{cols} needs {dp * rows * cols} processes but the world size is "
            f"{world} (launch with torchrun --nproc-per-node {dp * rows * cols}, or pass "
            f"mesh=... / mesh=auto{' / dp=...' if dp > 1 else ''})")


@dataclass(frozen=True)
class Grid:
    """The mesh as a rows x cols grid of tiles, seen either as it is or transposed.

    The transposed view is the one the ending-node triangle attention works in: my tile,
    transposed locally, is tile (c, r) of z^T on a cols x rows grid whose ring "j" is the
    mesh's ring_i. Algorithms written for a Grid work unchanged on both views.
    """

    rows: int
    cols: int
    coord: tuple[int, int]
    base: int  # global rank of my mesh's (0, 0)
    mesh_cols: int  # the mesh's own column count (for rank arithmetic)
    transposed: bool
    ring_j: dist.ProcessGroup  # my grid row (same first coordinate)
    ring_i: dist.ProcessGroup  # my grid column
    group: dist.ProcessGroup

    def rank_of(self, a: int, b: int) -> int:
        r, c = (b, a) if self.transposed else (a, b)
        return self.base + r * self.mesh_cols + c

    def ring(self, ring: str) -> dist.ProcessGroup:
        return self.ring_j if as_ring(ring) == Ring.RING_J else self.ring_i

    def ring_size(self, ring: str) -> int:
        return self.cols if as_ring(ring) == Ring.RING_J else self.rows


class CPMesh:
    """A rows x cols context-parallel mesh: the whole default process group, or one of its
    ``dp`` slices.

    Rank (r, c) = r*cols + c owns pair tile z[I_r, J_c].
    ``ring_j`` = my tile row {(r, c') for all c'} (ranks sharing my i-block, group rank c');
    ``ring_i`` = my tile column {(r', c) for all r'} (ranks sharing my j-block, group rank r').
    ``transpose_partner`` = the rank owning tile (c, r) (myself on the diagonal).

    Memberships on 2x2 (rank = (r, c)):

        rank  coord  ring_j   ring_i   transpose_partner
        0     (0,0)  {0,1}    {0,2}    0
        1     (0,1)  {0,1}    {1,3}    2
        2     (1,0)  {2,3}    {0,2}    1
        3     (1,1)  {2,3}    {1,3}    3

    Memberships on 3x3:

        rank  coord  ring_j    ring_i    transpose_partner
        0     (0,0)  {0,1,2}   {0,3,6}   0
        1     (0,1)  {0,1,2}   {1,4,7}   3
        2     (0,2)  {0,1,2}   {2,5,8}   6
        3     (1,0)  {3,4,5}   {0,3,6}   1
        4     (1,1)  {3,4,5}   {1,4,7}   4
        5     (1,2)  {3,4,5}   {2,5,8}   7
        6     (2,0)  {6,7,8}   {0,3,6}   2
        7     (2,1)  {6,7,8}   {1,4,7}   5
        8     (2,2)  {6,7,8}   {2,5,8}   8

    On 1x1 every ring has size 1 and the transpose partner is rank 0 itself.
    """

    def __init__(self, device_mesh: DeviceMesh, rows: int, cols: int, *, dp: int = 1,
                 group: dist.ProcessGroup | None = None, dp_group: dist.ProcessGroup | None = None):
        self.rows, self.cols = rows, cols
        self.size = rows * cols
        self.rank = dist.get_rank()
        self.dp, self.dp_index = dp, self.rank // self.size
        self.base = self.dp_index * self.size  # global rank of my tile (0, 0): the writer
        self.coord = self.coord_of(self.rank)
        # DTensors live on my 2D slice; the rings come from the full (dp, cp_i, cp_j) mesh.
        self.device_mesh = device_mesh if dp == 1 else device_mesh[MESH_DIM_NAMES]
        self.group = dist.group.WORLD if group is None else group
        self.dp_group = dp_group  # my tile position across the dp meshes (None when dp == 1)
        self.ring_j = device_mesh.get_group("cp_j")
        self.ring_i = device_mesh.get_group("cp_i")

    @classmethod
    def build(cls, rows: int, cols: int, device_type: str = "cpu", dp: int = 1) -> "CPMesh":
        """Build the mesh (my dp slice of it) from the initialised default process group.

        Raises ConfigError (on every rank, before any collective) when dp*rows*cols differs
        from the world size or the process group is not initialised.
        """
        rows, cols = parse_mesh((rows, cols))
        if not dist.is_initialized():
            raise ConfigError("CPMesh.build needs an initialised process group "
                              "(call boltz_cp.distributed.init_distributed first)")
        world = dist.get_world_size()
        check_mesh_size(rows, cols, world, dp)
        if dp == 1:
            dm = DeviceMesh(device_type, torch.arange(world).view(rows, cols),
                            mesh_dim_names=MESH_DIM_NAMES)
            return cls(dm, rows, cols)
        dm = DeviceMesh(device_type, torch.arange(world).view(dp, rows, cols),
                        mesh_dim_names=(DP_DIM_NAME, *MESH_DIM_NAMES))
        size, mine = rows * cols, dist.get_rank() // (rows * cols)
        group = None
        for d in range(dp):  # every rank creates every slice's group, in the same order
            g = dist.new_group(list(range(d * size, (d + 1) * size)))
            group = g if d == mine else group
        return cls(dm, rows, cols, dp=dp, group=group, dp_group=dm.get_group(DP_DIM_NAME))

    def __repr__(self) -> str:
        dp = f", dp={self.dp_index}/{self.dp}" if self.dp > 1 else ""
        return f"CPMesh({self.rows}x{self.cols}, rank={self.rank}, coord={self.coord}{dp})"

    # -- rank arithmetic -------------------------------------------------------------------
    @property
    def writer(self) -> int:
        """Global rank of my mesh's writer (tile (0, 0)): it gathers outputs and writes files."""
        return self.base

    @property
    def is_writer(self) -> bool:
        return self.rank == self.base

    @property
    def local_rank(self) -> int:
        """My rank inside my mesh, r*cols + c (the global rank when dp == 1)."""
        return self.rank - self.base

    def rank_of(self, r: int, c: int) -> int:
        """Global rank of tile (r, c) of my mesh."""
        return self.base + r * self.cols + c

    def coord_of(self, rank: int) -> tuple[int, int]:
        """Tile (r, c) of a global rank of my mesh."""
        local = rank - self.base
        if not 0 <= local < self.size:
            raise ValueError(f"rank {rank} is not in my mesh (ranks {self.base}..{self.base + self.size - 1})")
        return local // self.cols, local % self.cols

    def grid(self, transposed: bool = False) -> Grid:
        """My mesh as a `Grid` (transposed: the cols x rows view of z^T's tiles)."""
        r, c = self.coord
        if transposed:
            return Grid(self.cols, self.rows, (c, r), self.base, self.cols, True, self.ring_i, self.ring_j,
                        self.group)
        return Grid(self.rows, self.cols, (r, c), self.base, self.cols, False, self.ring_j, self.ring_i,
                    self.group)

    @property
    def is_square(self) -> bool:
        return self.rows == self.cols

    @property
    def token_multiple(self) -> int:
        """Pad N to a multiple of this (rows*cols): then pair tiles, row blocks and fully
        sharded single blocks all have equal sizes on every rank."""
        return self.rows * self.cols

    @property
    def transpose_partner(self) -> int:
        """Global rank owning tile (c, r); myself on the diagonal. Square meshes only."""
        if not self.is_square:
            raise ConfigError(f"tile (c, r) has a single owner on a square mesh only, got "
                              f"{self.rows}x{self.cols} (comm.transpose_exchange handles any mesh)")
        r, c = self.coord
        return self.rank_of(c, r)

    # -- rings ---------------------------------------------------------------------------
    def ring(self, ring: str) -> dist.ProcessGroup:
        """"j" -> ring_j (my tile row), "i" -> ring_i (my tile column)."""
        return self.ring_j if as_ring(ring) == Ring.RING_J else self.ring_i

    def ring_members(self, ring: str) -> list[int]:
        """Global ranks of a ring in ring order (position p = group rank p)."""
        r, c = self.coord
        if as_ring(ring) == Ring.RING_J:
            return [self.rank_of(r, k) for k in range(self.cols)]
        return [self.rank_of(k, c) for k in range(self.rows)]

    def ring_position(self, ring: str) -> int:
        """My position (= group rank) on a ring: c on ring_j, r on ring_i."""
        return self.coord[1] if as_ring(ring) == Ring.RING_J else self.coord[0]

    def ring_neighbors(self, ring: str, shift: int) -> tuple[int, int]:
        """(dst, src) global ranks for a shift by ``shift`` positions along ``ring``.

        I send to the member ``shift`` positions ahead of me and receive from the one
        ``shift`` positions behind (mod ring size). shift=-1 on ring_j sends to the left
        neighbour (c-1) and receives from the right one (c+1).
        """
        members = self.ring_members(ring)
        n, pos = len(members), self.ring_position(ring)
        return members[(pos + shift) % n], members[(pos - shift) % n]

    def group_rank(self, ring: str, global_rank: int) -> int:
        """Position of ``global_rank`` inside ``ring`` (via `convert_rank`)."""
        return convert_rank(self.ring(ring), global_rank=global_rank)
