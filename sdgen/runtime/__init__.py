"""Where and how models run: device and dtype, the out-of-memory ladder, compilation, cache folders."""
