import numpy as np
import pytest
import torch

from es_mpi.noise import SEED_MASK, derive_seed, member_seeds, tensor_noise


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3)
    seeds = {derive_seed(0, g, i) for g in range(20) for i in range(50)}
    assert len(seeds) == 1000
    assert all(0 <= s <= SEED_MASK for s in seeds)
    # parts are length-prefixed: no collisions from concatenation
    assert derive_seed("ab", "c") != derive_seed("a", "bc")
    assert derive_seed(1, 23) != derive_seed(12, 3)


@pytest.mark.parametrize("antithetic", [False, True])
def test_member_seeds(antithetic):
    seeds_n, signs_n = member_seeds(7, 3, 6, antithetic)
    again, _ = member_seeds(7, 3, 6, antithetic)
    assert seeds_n.dtype == np.int64 and signs_n.dtype == np.int8
    assert np.array_equal(seeds_n, again)
    if antithetic:
        assert np.array_equal(seeds_n[0::2], seeds_n[1::2])
        assert signs_n.tolist() == [1, -1, 1, -1, 1, -1]
        assert len(set(seeds_n[0::2].tolist())) == 3
    else:
        assert len(set(seeds_n.tolist())) == 6
        assert (signs_n == 1).all()
    other, _ = member_seeds(7, 4, 6, antithetic)
    assert not set(other.tolist()) & set(seeds_n.tolist())


def test_tensor_noise_deterministic_and_independent_per_tensor():
    cpu = torch.device("cpu")
    a = tensor_noise(123, "layers.0.q.weight", torch.Size([64, 64]), cpu)
    b = tensor_noise(123, "layers.0.q.weight", torch.Size([64, 64]), cpu)
    assert a.dtype == torch.float32 and torch.equal(a, b)
    # same shape, same member seed, other tensor: independent noise (the anchors' bug)
    c = tensor_noise(123, "layers.0.k.weight", torch.Size([64, 64]), cpu)
    assert not torch.equal(a, c)
    assert abs(torch.corrcoef(torch.stack([a.flatten(), c.flatten()]))[0, 1]) < 0.05
    d = tensor_noise(124, "layers.0.q.weight", torch.Size([64, 64]), cpu)
    assert not torch.equal(a, d)


def test_tensor_noise_is_standard_normal():
    x = tensor_noise(5, "w", torch.Size([200_000]), torch.device("cpu")).double()
    assert abs(x.mean().item()) < 0.01
    assert abs(x.std().item() - 1.0) < 0.01


def test_noise_of_a_tensor_is_its_chunks_each_with_its_own_seed():
    from es_mpi.noise import NOISE_CHUNK, chunk_noise, tensor_noise

    shape = (3, NOISE_CHUNK // 2 + 5)  # 1.5 chunks and a bit
    eps = tensor_noise(9, "w", torch.Size(shape), torch.device("cpu")).view(-1)
    first = chunk_noise(9, "w", 0, torch.empty(NOISE_CHUNK))
    rest = chunk_noise(9, "w", 1, torch.empty(eps.numel() - NOISE_CHUNK))
    assert torch.equal(eps, torch.cat([first, rest]))
    assert not torch.equal(first[:100], rest[:100])
