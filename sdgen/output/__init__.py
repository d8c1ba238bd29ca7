"""Output: numbered PNG files (writer), their metadata chunks, the grid, the invisible watermark."""
