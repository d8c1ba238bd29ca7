"""sdgen's own networks in the original LDM layout (plain torch: no diffusers or transformers import)."""
