"""Shape buckets: round sizes up so varied inputs reuse a few compiled programs."""


def pow2_bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    return 1 << max(int(n) - 1, int(minimum) - 1, 0).bit_length()
