"""CP twins of upstream Boltz-2 layers: same class and attribute names (checkpoint keys),
forward on DTensor tiles with explicit communication. One file per upstream layer file."""
