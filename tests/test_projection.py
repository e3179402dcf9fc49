"""The projection against its written spec, PEFT 0.21.2, and the isometry it must be."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from peft.tuners.unilora.model import UniLoraModel

from unilora_hf.projection import Projection, feistel_keys, native_indices_numpy, peft_generate_index

VECTORS = json.loads((Path(__file__).parent / "data" / "projection_vectors.json").read_text())


@pytest.mark.parametrize("v", VECTORS, ids=lambda v: f"seed{v['seed']}-D{v['D']}-d{v['d']}")
def test_native_matches_test_vectors(v):
    P = Projection.build("native", v["seed"], v["D"], v["d"])
    assert list(feistel_keys(v["seed"])) == v["keys"]
    pos = torch.tensor(v["positions"])
    assert P.permute(pos).tolist() == v["pi"]
    assert P.indices(0, v["D"])[pos].tolist() == v["idx"] if v["D"] < 10**6 else True
    assert native_indices_numpy(v["seed"], v["D"], v["d"], np.array(v["positions"])).tolist() == v["idx"]
    assert list(P.scale_values) == v["scales"]


@pytest.mark.parametrize("D,d", [(1, 1), (7, 3), (1000, 37), (50, 100), (4097, 4096), (65536, 513)])
def test_native_torch_equals_numpy_and_is_a_bijection(D, d):
    P = Projection.build("native", 1234, D, d)
    pos = torch.arange(D)
    pi = P.permute(pos)
    assert torch.equal(torch.sort(pi).values, pos)  # a permutation of [0, D)
    assert torch.equal(P.unpermute(pi), pos)  # invertible
    assert np.array_equal(native_indices_numpy(1234, D, d, np.arange(D)), (pi % d).numpy())
    assert P.stored_bytes() == 0


@pytest.mark.parametrize("D,d", [(1000, 37), (60, 7), (37, 37), (20, 50)])
def test_native_balance_and_column_rows(D, d):
    P = Projection.build("native", 9, D, d)
    idx = P.indices(0, D)
    counts = torch.bincount(idx, minlength=d)
    q, rem = divmod(D, d)
    expected = torch.tensor([q + (1 if j < rem else 0) for j in range(d)])
    assert torch.equal(counts, expected)
    for j in range(d):
        rows = P.column_rows(j)
        assert torch.equal(torch.sort(rows).values, (idx == j).nonzero().flatten())


@pytest.mark.parametrize("kind", ["native", "peft"])
@pytest.mark.parametrize("D,d", [(300, 17), (17, 40), (64, 64)])
def test_isometry(kind, D, d):
    P = Projection.build(kind, 5, D, d).dense(torch.float64)
    gram = P.T @ P
    used = (P != 0).any(0)
    expected = torch.diag(used.double())
    # float32 scales: 1/sqrt(n) squared times n equals 1 to float32 rounding
    assert torch.allclose(gram, expected, atol=1e-6, rtol=0)
    assert torch.equal(gram - torch.diag(torch.diagonal(gram)), torch.zeros_like(gram))  # columns orthogonal
    assert ((P != 0).sum(1) == 1).all()  # one non-zero per row
    if D >= d:
        assert used.all()
    else:
        assert used.sum().item() == D


@pytest.mark.parametrize("D,d,seed", [(1000, 37, 42), (10, 100, 3), (123457, 1000, 7), (2_000_000, 131072, 1)])
def test_peft_kind_is_bit_identical_to_peft(D, d, seed):
    ours = Projection.build("peft", seed, D, d)
    theirs = UniLoraModel.generate_index(D, d, seed)
    assert torch.equal(ours.indices(0, D), theirs)
    counts = torch.bincount(theirs, minlength=d)
    inv = torch.zeros(d)
    inv[counts > 0] = counts[counts > 0].float().rsqrt()
    assert torch.equal(ours.scales_of(theirs), inv[theirs])  # PEFT's float32 scales, bit for bit
    assert peft_generate_index(D, d, seed).dtype == torch.int32


def test_native_rebuild_at_200M_stores_nothing():
    start = time.perf_counter()
    P = Projection.build("native", 42, 200_000_000, 524_288)
    elapsed = time.perf_counter() - start
    assert P.stored_bytes() == 0
    assert elapsed < 0.1, f"rebuilding the native projection took {elapsed:.3f} s"
    idx = P.indices(199_999_000, 1000)
    assert int(idx.min()) >= 0 and int(idx.max()) < 524_288


def test_bad_projection_arguments():
    with pytest.raises(ValueError, match="projection kind"):
        Projection.build("dense", 0, 10, 2)
    with pytest.raises(ValueError, match="D = 0"):
        Projection.build("native", 0, 0, 2)
    with pytest.raises(ValueError, match="proj_seed"):
        Projection.build("native", -1, 10, 2)
