"""Checkpoints: reading files safely (files), their original yaml (ldm_config), building modules on the meta
device (build), the default model (hub), A1111's hash (hashing), and loading it all (load)."""
