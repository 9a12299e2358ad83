"""Every random stream of a run derives from run.seed, what the stream is for, and where in the run it is
(epoch, rank, step): a resumed run replays exactly what an uninterrupted one would have done, and no two
purposes draw the same numbers (a hash, not sums of multiples, which can coincide)."""
from __future__ import annotations

import hashlib


def derive_seed(seed: int, purpose: str, *where: int) -> int:
    """A seed in [0, 2**63) for torch.Generator.manual_seed / numpy, fixed by (seed, purpose, *where)."""
    digest = hashlib.blake2b(repr((int(seed), purpose, *map(int, where))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
