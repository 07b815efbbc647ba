"""The ES core on plain tensors: update vs a NumPy reference, exact restore, learning."""

import numpy as np
import pytest
import torch

from es_mpi.es import Replica, checksum, es_update_, noise_coefficients
from es_mpi.noise import member_seeds, tensor_noise
from es_mpi.shaping import shape


def _master():
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(8, 5, generator=g), "a.bias": torch.randn(8, generator=g),
            "b.weight": torch.randn(8, 5, generator=g)}


def _reference(master, seeds_n, signs_n, z_n, lr, wd=0.0, anchor=None):
    """theta + lr/N sum_i z_i sign_i eps_i - lr wd (theta - anchor), in float64 NumPy."""
    out = {}
    for name, theta in master.items():
        t = theta.double().numpy()
        step = np.zeros_like(t)
        for seed, sign, z in zip(seeds_n, signs_n, z_n, strict=True):
            eps = tensor_noise(int(seed), name, theta.shape, torch.device("cpu")).double().numpy()
            step += z * sign * eps
        a = 0.0 if anchor is None else anchor[name].double().numpy()
        out[name] = t - lr * wd * (t - a) + lr / len(z_n) * step
    return out


@pytest.mark.parametrize("antithetic", [False, True])
@pytest.mark.parametrize("wd,to_init", [(0.0, False), (0.1, False), (0.1, True)])
def test_update_matches_numpy_reference(antithetic, wd, to_init):
    master = _master()
    anchor = {k: v + 0.5 for k, v in master.items()} if to_init else None
    seeds_n, signs_n = member_seeds(3, 0, 6, antithetic)
    z_n = shape(np.array([1.0, 4.0, 2.0, 8.0, 5.0, 7.0]), "zscore")
    ref = _reference(master, seeds_n, signs_n, z_n, lr=0.01, wd=wd, anchor=anchor)
    es_update_(master, seeds_n, signs_n, z_n, lr=0.01, weight_decay=wd, anchor=anchor)
    for name, theta in master.items():
        assert theta.dtype == torch.float32
        np.testing.assert_allclose(theta.double().numpy(), ref[name], rtol=1e-6, atol=1e-7)


def test_antithetic_pairs_collapse_to_one_noise():
    seeds_n, signs_n = member_seeds(0, 0, 4, True)
    coef = noise_coefficients(seeds_n, signs_n, np.array([1.0, 0.25, -2.0, 0.5]))
    assert [c for _, c in coef] == [0.75, -2.5]
    assert [s for s, _ in coef] == [int(seeds_n[0]), int(seeds_n[2])]


def test_update_is_bit_identical_when_repeated():
    a, b = _master(), _master()
    seeds_n, signs_n = member_seeds(9, 4, 5, False)
    z_n = shape(np.arange(5.0), "rank")
    es_update_(a, seeds_n, signs_n, z_n, 0.05)
    es_update_(b, seeds_n, signs_n, z_n, 0.05)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert checksum(a) == checksum(b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturb_restore_is_exact(dtype):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)).to(dtype)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    replica = Replica(dict(module.named_parameters()))
    for member in range(20):
        replica.perturb(seed=member, sign=-1 if member % 2 else 1, sigma=0.1)
        assert not torch.equal(module[0].weight, before["0.weight"])
        replica.restore()
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the perturbed weights are master + sign * sigma * eps, computed in fp32
    replica.perturb(seed=3, sign=-1, sigma=0.1)
    eps = tensor_noise(3, "1.weight", module[1].weight.shape, torch.device("cpu"))
    expect = before["1.weight"].double() - 0.1 * eps.double()
    tol = 1e-7 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(module[1].weight.detach().double(), expect, rtol=tol, atol=tol)


def test_checksum_sees_one_bit_flip():
    master = _master()
    before = checksum(master)
    bits = master["a.bias"].view(torch.int32)
    bits[3] ^= 1 << 7
    assert checksum(master) != before
    bits[3] ^= 1 << 7
    assert checksum(master) == before


def test_es_improves_a_toy_objective():
    """Reward = -||w - target||^2 on a 20-d linear 'model': ES must close most of the gap."""
    torch.manual_seed(1)
    target = torch.randn(20)
    model = torch.nn.Linear(20, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    replica = Replica(dict(model.named_parameters()))

    def reward():
        return -float(((model.weight[0].detach() - target) ** 2).sum())

    start = reward()
    for t in range(150):
        seeds_n, signs_n = member_seeds(0, t, 16, True)
        rewards_n = np.empty(16)
        for i in range(16):
            replica.perturb(int(seeds_n[i]), int(signs_n[i]), sigma=0.05)
            rewards_n[i] = reward()
            replica.restore()
        replica.update(seeds_n, signs_n, shape(rewards_n, "zscore"), lr=0.05)
    assert reward() > 0.1 * start  # start is about -20; at least 90% of the gap closed


def test_mirror_member_is_the_same_with_or_without_its_pair_held():
    """fp32 minus member = theta - (theta+ - theta): evaluating it right after its plus
    (no noise made) or alone (another rank) gives the same weights, bit for bit."""
    gen = torch.Generator().manual_seed(4)
    params = {"w": torch.nn.Parameter(torch.randn(50, 30, generator=gen), requires_grad=False),
              "h": torch.nn.Parameter(torch.randn(7, generator=gen).to(torch.bfloat16),
                                      requires_grad=False)}
    rep = Replica(params)
    rep.perturb(21, 1, 0.01)
    plus = {n: p.detach().clone() for n, p in params.items()}
    rep.perturb(21, -1, 0.01)                       # after its pair: no noise made
    after_pair = {n: p.detach().clone() for n, p in params.items()}
    rep.restore()
    rep.perturb(5, 1, 0.01)                         # someone else's member in between
    rep.perturb(21, -1, 0.01)                       # alone
    for n, p in params.items():
        assert torch.equal(p.detach(), after_pair[n]), n
    theta = rep.master["w"]
    assert torch.equal(after_pair["w"], theta - (plus["w"] - theta))
    eps = tensor_noise(21, "h", (7,), torch.device("cpu"))
    assert torch.equal(after_pair["h"], rep.master["h"].add(eps, alpha=-0.01).to(torch.bfloat16))
    rep.restore()
    assert torch.equal(params["w"].detach(), rep.master["w"])


def reference_checksum(tensors) -> int:
    """BLAKE2b-64 (person es-mpi-check) over each tensor's name, the exact sum of its bits
    read as signed integers of its element size (16 bytes, little-endian), and its shape;
    in plain Python, element by element."""
    import hashlib
    import struct

    h = hashlib.blake2b(digest_size=8, person=b"es-mpi-check")
    for name, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes()
        fmt = {4: "i", 2: "h"}[t.element_size()]
        total = sum(v for (v,) in struct.iter_unpack("<" + fmt, raw))
        h.update(name.encode())
        h.update(total.to_bytes(16, "little", signed=True))
        h.update(str(tuple(t.shape)).encode())
    return int.from_bytes(h.digest(), "little") & (2**63 - 1)


def test_checksum_is_the_documented_fingerprint_of_the_bits():
    """The value run files record (replay checks against it, so it may never change)."""
    tensors = {"w": torch.randn(5, 3), "b": torch.randn(7).to(torch.bfloat16),
               "big": torch.randn(3 * (1 << 22) // 2)}  # more than one 4M chunk
    assert checksum(tensors) == reference_checksum(tensors)


@pytest.mark.parametrize("on_host", [False, True])
def test_update_with_checksum_returns_the_new_weights_fingerprint(on_host):
    """The checksum taken tensor by tensor during the update is the fingerprint of the
    weights after it, and the update is the same with or without it."""
    module = torch.nn.Linear(6, 4)
    params = dict(module.named_parameters())
    plain = Replica({n: torch.nn.Parameter(p.detach().clone()) for n, p in params.items()})
    fused = Replica(params, master_on_host=on_host)
    seeds_n, signs_n = member_seeds(3, 0, 4, True)
    z_n = shape(np.array([1.0, -2.0, 0.5, 3.0]), "zscore")
    assert plain.update(seeds_n, signs_n, z_n, 0.01, 0.1) is None
    check = fused.update(seeds_n, signs_n, z_n, 0.01, 0.1, with_checksum=True)
    weights = {n: p.detach() for n, p in params.items()}
    assert check == reference_checksum(weights) == reference_checksum(plain.master)
    for name, p in params.items():
        assert torch.equal(p.detach(), plain.params[name].detach())
