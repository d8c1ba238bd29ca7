"""sdgen: local text-to-image from Stable Diffusion checkpoint files."""

__version__ = "0.1.0"
