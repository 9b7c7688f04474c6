"""Shape buckets: round sizes up so varied inputs reuse a few compiled programs."""


def pow2_bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    return 1 << max(int(n) - 1, int(minimum) - 1, 0).bit_length()


def pow4_bucket(n: int) -> int:
    """Smallest power of four >= max(n, 1)."""
    return 1 << 2 * ((max(int(n), 1) - 1).bit_length() + 1 >> 1)


def fine_bucket(n: int, minimum: int = 1, steps_per_octave: int = 4) -> int:
    """Smallest size >= max(n, minimum) of the form m * 2**e with m < 2 * steps_per_octave: each
    power-of-two range is split into `steps_per_octave` equal steps (16, 20, 24, 28, 32, 40, ...),
    so padding wastes at most 1/steps_per_octave of the work for a few more compiled shapes."""
    n = max(int(n), int(minimum), 1)
    octave = pow2_bucket(n)
    step = max(octave // (2 * steps_per_octave), 1)
    return -(-n // step) * step
