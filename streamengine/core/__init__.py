"""The pure core: decisions without I/O (the clock is passed in)."""
