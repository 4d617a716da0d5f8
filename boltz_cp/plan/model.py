"""What the plan models: the architecture and run (`Hyper`), the mesh geometry, dtype classes.

The architecture's widths and depths are read from `boltz_cp.models.checkpoint.PRESETS["full"]`
(Boltz-2 as released, 506,724,992 parameters); run settings (recycles, steps, samples, MSA rows)
come from the same keys `boltz_cp predict` takes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from boltz_cp.models.checkpoint import PRESETS

MIB = 2**20
GB = 1e9


def _full() -> dict:
    """Widths and depths of the `full` preset (Boltz-2 as released)."""
    hp = PRESETS["full"]
    pf, msa, tpl, score = hp["pairformer_args"], hp["msa_args"], hp["template_args"], hp["score_model_args"]
    conf = hp["confidence_model_args"]["pairformer_args"]
    return {
        "token_s": hp["token_s"], "token_z": hp["token_z"], "atom_s": hp["atom_s"], "atom_z": hp["atom_z"],
        "pairformer_blocks": pf["num_blocks"], "s_heads": pf["num_heads"],
        # upstream's PairformerLayer defaults (the full preset does not set them)
        "tri_heads": pf.get("pairwise_num_heads", 4), "tri_width": pf.get("pairwise_head_width", 32),
        "msa_blocks": msa["msa_blocks"], "msa_s": msa["msa_s"],
        "template_blocks": tpl["template_blocks"], "template_dim": tpl["template_dim"],
        "token_transformer_depth": score["token_transformer_depth"],
        "token_transformer_heads": score["token_transformer_heads"],
        "atom_encoder_depth": score["atom_encoder_depth"], "atom_decoder_depth": score["atom_decoder_depth"],
        "atom_heads": score["atom_encoder_heads"], "confidence_blocks": conf["num_blocks"], "num_bins": hp["num_bins"],
        "window_queries": hp["atoms_per_window_queries"], "window_keys": hp["atoms_per_window_keys"],
    }


@dataclass(frozen=True)
class Hyper:
    """What the model needs of a Boltz-2 architecture and run (`BOLTZ2`: as released)."""

    token_s: int
    token_z: int
    atom_s: int
    atom_z: int
    pairformer_blocks: int
    s_heads: int  # pairformer single-track attention heads
    tri_heads: int  # triangle attention heads x width
    tri_width: int
    msa_blocks: int
    msa_s: int
    template_blocks: int
    template_dim: int
    token_transformer_depth: int
    token_transformer_heads: int
    atom_encoder_depth: int  # diffusion atom encoder (and the input embedder's)
    atom_decoder_depth: int
    atom_heads: int
    confidence_blocks: int
    num_bins: int
    window_queries: int
    window_keys: int
    msa_rows: int = 1  # MSA rows after subsampling (1: single-sequence input, msa: empty)
    templates: int = 1  # templates T (the featurizer gives one all-masked template when none)
    recycling_steps: int = 3
    sampling_steps: int = 200
    samples: int = 1  # diffusion samples of the run (time per sample divides by it)
    samples_at_once: int = 1  # of those, denoised together per step (sets the step's memory)
    atoms_per_token: float = 8.4  # featurize_lean on synthetic proteins: 8,384 atoms / 1,000 tokens

    @property
    def tri_hd(self) -> int:
        return self.tri_heads * self.tri_width

    @property
    def token_trans_channels(self) -> int:
        """token_trans_bias channels: one H_t-head bias per token-transformer layer (3 C_z at Boltz-2)."""
        return self.token_transformer_depth * self.token_transformer_heads

    def with_run(self, **settings) -> Hyper:
        return replace(self, **settings)


def samples_at_once(samples: int, max_parallel_samples: int | None) -> int:
    """Samples upstream's sampler denoises together: `torch.arange(samples).chunk(samples %
    max_parallel_samples + 1)`, the first chunk (None: all at once)."""
    samples = max(samples, 1)
    pieces = samples % (max_parallel_samples or samples) + 1
    return -(-samples // pieces)


BOLTZ2 = Hyper(**_full())

# Parameters of Boltz2CP with the `full` preset's widths, by part (counted by building the model:
# all stacks 1 deep, then each stack 2 deep; `python benchmarks/model.py params` recounts; atom
# encoder / decoder depths fixed at 3). With Boltz-2's depths they add up to 506,724,992, the
# released checkpoint's count (tests/test_plan.py checks it).
PARAMS_BASE = 12_936_064  # everything outside the per-block counts below (embedder, heads, conditioning, ...)
PARAMS_PER_BLOCK = {
    "pairformer_blocks": 3_070_848,
    "msa_blocks": 795_136,
    "template_blocks": 181_632,
    "confidence_blocks": 3_070_848,
    "token_transformer_depth": 11_214_336,  # a layer + its token_trans_proj_z
}


def parameter_count(hp: Hyper) -> int:
    """Parameters of the model (the released Boltz-2: 506,724,992)."""
    return PARAMS_BASE + sum(getattr(hp, k) * v for k, v in PARAMS_PER_BLOCK.items())


def weights_bytes(hp: Hyper) -> float:
    """Parameter bytes per rank: every rank holds all weights (fp32 master weights under autocast)."""
    return parameter_count(hp) * 4.0


@dataclass(frozen=True)
class Geometry:
    """N tokens (M atoms) on an R x C mesh: my tile is [n, m] pairs (n = N_padded / R query
    rows, m = N_padded / C columns; N_padded = N rounded up to a multiple of R * C, as
    `CPMesh.token_multiple` pads it)."""

    n_tokens: int
    rows: int
    cols: int
    atoms: int

    @property
    def ranks(self) -> int:
        return self.rows * self.cols

    @property
    def is_square(self) -> bool:
        return self.rows == self.cols

    @property
    def side(self) -> int:
        """Ring steps of the larger ring (Cannon's p on a square mesh)."""
        return max(self.rows, self.cols)

    @property
    def n_padded(self) -> int:
        return -(-self.n_tokens // self.ranks) * self.ranks

    @property
    def n(self) -> int:
        """Tile rows (tokens of my row block I_r)."""
        return self.n_padded // self.rows

    @property
    def m(self) -> int:
        """Tile columns (tokens of my column block J_c)."""
        return self.n_padded // self.cols

    @property
    def pairs(self) -> int:
        return self.n * self.m

    @property
    def local_atoms(self) -> int:
        """L: atoms per rank (whole 32-atom windows, split evenly; at least the 48-atom halo)."""
        windows = -(-self.atoms // 32)
        return max(-(-windows // self.ranks), 2) * 32

    @property
    def label(self) -> str:
        return f"{self.rows}x{self.cols}"


def geometry(n_tokens: int, rows: int, cols: int | None = None, hp: Hyper = BOLTZ2,
             atoms: int | None = None) -> Geometry:
    """An R x C geometry (C defaults to R); atoms default to hp.atoms_per_token per token."""
    return Geometry(n_tokens, rows, rows if cols is None else cols,
                    atoms if atoms is not None else round(n_tokens * hp.atoms_per_token))


@dataclass(frozen=True)
class Dtypes:
    """Bytes per element of three dtype classes: A (activations: 4 B in fp32, 2 B in bf16), F
    (promoted to at least fp32 by the code: triangle attention, Cannon operands, softmax states),
    L (LayerNorm outputs: fp32 under autocast)."""

    A: int
    F: int = 4
    L: int = 4

    @classmethod
    def of(cls, precision: str) -> Dtypes:
        if precision == "fp32":
            return cls(4)
        if precision in ("bf16", "bf16-mixed"):
            return cls(2)
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
