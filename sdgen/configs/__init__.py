"""Original-LDM-style inference configs shipped with sdgen (installed as the package ``sdgen.configs``)."""
