"""The 2D context-parallel mesh: axes, rings and rank arithmetic.

Mesh dim 0 is ``cp_i`` (it splits token dim i = pair dim 1, the mesh *rows*); mesh dim 1 is
``cp_j`` (it splits token dim j = pair dim 2, the mesh *cols*). Rank (r, c) = r*cols + c owns
the pair tile z[I_r, J_c].

Rings are named by the axis they run over, never by the DeviceMesh sub-mesh name:
``ring_j`` runs along j over the ranks that share my i-block (my tile row) and is
``device_mesh.get_group("cp_j")``; ``ring_i`` runs along i over the ranks that share my
j-block (my tile column) and is ``device_mesh.get_group("cp_i")``. The group rank of a
member of ``ring_j`` is its column c, of ``ring_i`` its row r.

Building a mesh creates process groups (a collective over the whole world), so every rank
must call `CPMesh.build` with the same arguments. Size errors are raised on every rank
before any collective, so they never hang.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from boltz_cp.errors import ConfigError

MESH_DIM_NAMES = ("cp_i", "cp_j")


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


def check_mesh_size(rows: int, cols: int, world: int) -> None:
    """ConfigError unless the mesh uses exactly the launched processes (no communication)."""
    if rows * cols != world:
        raise ConfigError(
            f"mesh {rows}x{cols} needs {rows * cols} processes but the world size is "
            f"{world} (launch with torchrun --nproc-per-node {rows * cols}, or pass "
            f"mesh=...)")


class CPMesh:
    """A rows x cols context-parallel mesh over the current default process group.

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

    def __init__(self, device_mesh: DeviceMesh, rows: int, cols: int):
        self.device_mesh = device_mesh
        self.rows, self.cols = rows, cols
        self.size = rows * cols
        self.rank = dist.get_rank()
        self.coord = (self.rank // cols, self.rank % cols)
        # The whole 2D mesh; equals WORLD while the mesh spans the world.
        self.group = dist.group.WORLD
        self.ring_j = device_mesh.get_group("cp_j")
        self.ring_i = device_mesh.get_group("cp_i")

    @classmethod
    def build(cls, rows: int, cols: int, device_type: str = "cpu") -> "CPMesh":
        """Build the mesh from the initialised default process group.

        Raises ConfigError (on every rank, before any collective) when rows*cols differs
        from the world size or the process group is not initialised.
        """
        rows, cols = parse_mesh((rows, cols))
        if not dist.is_initialized():
            raise ConfigError("CPMesh.build needs an initialised process group "
                              "(call boltz_cp.distributed.init_distributed first)")
        world = dist.get_world_size()
        check_mesh_size(rows, cols, world)
        dm = DeviceMesh(device_type, torch.arange(world).view(rows, cols),
                        mesh_dim_names=MESH_DIM_NAMES)
        return cls(dm, rows, cols)

    def __repr__(self) -> str:
        return f"CPMesh({self.rows}x{self.cols}, rank={self.rank}, coord={self.coord})"

    # -- rank arithmetic -------------------------------------------------------------------
    def rank_of(self, r: int, c: int) -> int:
        """Global rank of tile (r, c)."""
        return r * self.cols + c

    def coord_of(self, rank: int) -> tuple[int, int]:
        """Tile (r, c) of a global rank."""
        return rank // self.cols, rank % self.cols

    @property
    def is_square(self) -> bool:
        return self.rows == self.cols

    def require_square(self, who: str) -> int:
        """The mesh side p; ConfigError naming ``who`` and the mesh unless it is square."""
        if not self.is_square:
            raise ConfigError(f"{who} needs a square mesh, got {self.rows}x{self.cols} "
                              f"(rectangular meshes are not supported yet)")
        return self.rows

    @property
    def token_multiple(self) -> int:
        """Pad N to a multiple of this (rows*cols): then pair tiles, row blocks and fully
        sharded single blocks all have equal sizes on every rank."""
        return self.rows * self.cols

    @property
    def transpose_partner(self) -> int:
        """Global rank owning tile (c, r); myself on the diagonal. Square meshes only."""
        if not self.is_square:
            raise ConfigError(f"a transpose exchange needs a square mesh, got "
                              f"{self.rows}x{self.cols}")
        r, c = self.coord
        return self.rank_of(c, r)

    # -- rings ---------------------------------------------------------------------------
    def ring(self, ring: str) -> dist.ProcessGroup:
        """"j" -> ring_j (my tile row), "i" -> ring_i (my tile column)."""
        if ring == "j":
            return self.ring_j
        if ring == "i":
            return self.ring_i
        raise ValueError(f"ring must be 'i' or 'j', got {ring!r}")

    def ring_members(self, ring: str) -> list[int]:
        """Global ranks of a ring in ring order (position p = group rank p)."""
        r, c = self.coord
        if ring == "j":
            return [self.rank_of(r, k) for k in range(self.cols)]
        if ring == "i":
            return [self.rank_of(k, c) for k in range(self.rows)]
        raise ValueError(f"ring must be 'i' or 'j', got {ring!r}")

    def ring_position(self, ring: str) -> int:
        """My position (= group rank) on a ring: c on ring_j, r on ring_i."""
        return self.coord[1] if ring == "j" else self.coord[0]

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
