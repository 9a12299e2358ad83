"""derive_seed: every random stream fixed by (seed, purpose, where), and no two streams alike."""
from __future__ import annotations

import itertools

from trainer.seeding import derive_seed


def test_the_same_inputs_give_the_same_seed_and_any_change_another() -> None:
    assert derive_seed(7, "training", 2, 1) == derive_seed(7, "training", 2, 1)
    seeds = {derive_seed(seed, purpose, *where)
             for seed, purpose, where in itertools.product(
                 (0, 1, 7), ("training", "batch-order", "augmentation"), ((0,), (1,), (0, 0), (2, 1), (1, 2)))}
    assert len(seeds) == 3 * 3 * 5
    assert all(0 <= s < 2**63 for s in seeds)


def test_rank_zero_attack_noise_is_not_the_batch_order_stream() -> None:
    """The bug this module replaced: the batch order's seed equalled rank 0's training seed."""
    for seed, epoch in itertools.product(range(3), range(1, 4)):
        assert derive_seed(seed, "training", epoch, 0) != derive_seed(seed, "batch-order", epoch)
