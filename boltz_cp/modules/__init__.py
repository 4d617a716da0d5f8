"""CP twins of upstream Boltz-2 modules (boltz/model/modules/): trunk, MSA, templates,
diffusion, confidence, assembled from the CP layers with upstream's attribute names."""
