"""The fixed Uni-LoRA projection P: which entry of θ_d each LoRA parameter reads, and with what scale.

The flattened LoRA parameters of a model are θ_D ∈ R^D (each adapted layer's A ∈ R^{r×in}, row-major,
then its B ∈ R^{out×r}, layers in module order). Uni-LoRA sets θ_D = P θ_d with P ∈ R^{D×d}: row i of P
has one non-zero, at column ``idx(i)``, of value ``1/sqrt(n_j)`` where ``n_j`` counts the rows mapped to
column j. Hence PᵀP = I on the used columns (an isometry), and ``θ_D[i] = θ_d[idx(i)] · scale(idx(i))``.

A projection is a pure function of (kind, seed, D, d, position). Two kinds exist; ``docs/projection.md``
gives the bit-level specification and test vectors.

``native`` (spec ``native-feistel-v1``): nothing of size D is stored or generated.
    Let k = max(2, ceil(log2 D)) rounded up to an even number, h = k/2. π is a 4-round balanced Feistel
    permutation of [0, 2^k) keyed by the seed, restricted to [0, D) by cycle-walking (apply π again
    while the value is ≥ D). Then ``idx(i) = π(i) mod d``. Column j's rows are ``π⁻¹(j + m·d)`` for
    m < n_j, with ``n_j = ⌊D/d⌋ + [j < D mod d]``: counts are balanced and known in closed form, so the
    gradient of θ_d is a deterministic gather-reduce over π⁻¹ (no atomics). The scale of column j is
    the float32 nearest to 1/sqrt(n_j) (computed in float64, rounded once).

``peft`` (spec ``peft-0.21``): bit-identical to PEFT 0.21.2 ``UniLoraModel.generate_index``: numpy
    ``default_rng(seed)``; every column repeated ⌊D/d⌋ times, plus ``rng.choice(d, D mod d,
    replace=False)`` extras, then ``rng.shuffle``. The indices are materialised once as int32 (4·D bytes);
    scales are PEFT's float32 ``rsqrt`` of the column counts.

All integer arithmetic of the native kind is done in int64 with explicit 32-bit masks, so torch (CPU and
CUDA), numpy and Triton give identical bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .errors import InvalidConfigError

NATIVE = "native"
PEFT = "peft"
SPEC_VERSIONS = {NATIVE: "native-feistel-v1", PEFT: "peft-0.21"}

MASK32 = 0xFFFFFFFF
MIX_MUL_1 = 0x7FEB352D
MIX_MUL_2 = 0x68E31DA5
KEY_STEP = 0x9E3779B9
FEISTEL_ROUNDS = 4
MAX_D = 1 << 62


def mix32(x: int) -> int:
    """The 32-bit integer hash used by the Feistel round function (scalar form)."""
    x ^= x >> 16
    x = (x * MIX_MUL_1) & MASK32
    x ^= x >> 15
    x = (x * MIX_MUL_2) & MASK32
    x ^= x >> 16
    return x


def _mix32_array(x):
    """`mix32` on an int64 torch tensor or numpy array whose values lie in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * MIX_MUL_1) & MASK32
    x = x ^ (x >> 15)
    x = (x * MIX_MUL_2) & MASK32
    return x ^ (x >> 16)


def feistel_keys(seed: int) -> tuple[int, ...]:
    """Round keys of the native permutation: ``key_i = mix32(s0 ^ mix32((s1 + (i+1)·0x9E3779B9) mod 2^32))``
    where ``s0, s1`` are the low and high 32 bits of the seed."""
    s0, s1 = seed & MASK32, (seed >> 32) & MASK32
    return tuple(mix32(s0 ^ mix32((s1 + (i + 1) * KEY_STEP) & MASK32)) for i in range(FEISTEL_ROUNDS))


def feistel_bits(D: int) -> int:
    """k: the even bit width of the Feistel domain [0, 2^k) that covers [0, D)."""
    k = max(2, (D - 1).bit_length())
    return k + (k & 1)


def _feistel(x, keys, half_bits: int, inverse: bool):
    mask = (1 << half_bits) - 1
    left, right = x >> half_bits, x & mask
    if not inverse:
        for key in keys:
            left, right = right, left ^ (_mix32_array(right ^ key) & mask)
    else:
        for key in reversed(keys):
            left, right = right ^ (_mix32_array(left ^ key) & mask), left
    return (left << half_bits) | right


def _walk(x, keys, half_bits: int, D: int, inverse: bool):
    """Cycle-walk: apply the Feistel permutation until every value lies in [0, D)."""
    y = _feistel(x, keys, half_bits, inverse)
    outside = y >= D
    while bool(outside.any()):
        y[outside] = _feistel(y[outside], keys, half_bits, inverse)
        outside = y >= D
    return y


def balanced_counts(D: int, d: int) -> tuple[int, int, int]:
    """(q, rem, used): column j has n_j = q + [j < rem] rows; ``used`` columns have n_j > 0."""
    q, rem = divmod(D, d)
    return q, rem, d if q > 0 else rem


def correctly_rounded_rsqrt(n: int) -> float:
    """The float32 nearest to 1/sqrt(n), as a Python float (0.0 for n = 0)."""
    return float(np.float32(1.0 / math.sqrt(n))) if n > 0 else 0.0


@dataclass(frozen=True)
class Projection:
    """P for one adapter: ``kind`` (``native`` or ``peft``), ``seed``, ``D`` rows and ``d`` columns.

    ``indices(start, count)`` gives idx(i) for positions [start, start+count) and ``scales_of(idx)`` the
    float32 scale of each column, so θ_D[start:start+count] = θ_d[idx] · scales_of(idx).
    """

    kind: str
    seed: int
    D: int
    d: int
    _peft_table: torch.Tensor | None = field(default=None, repr=False, compare=False)
    _peft_scales: torch.Tensor | None = field(default=None, repr=False, compare=False)
    _device_cache: dict = field(default_factory=dict, repr=False, compare=False)
    scale_dtype: torch.dtype | None = None

    @classmethod
    def build(cls, kind: str, seed: int, D: int, d: int) -> "Projection":
        if kind not in SPEC_VERSIONS:
            raise InvalidConfigError(f"projection kind {kind!r} is unknown; use one of {sorted(SPEC_VERSIONS)}")
        if not 0 < D <= MAX_D:
            raise InvalidConfigError(f"D = {D} is out of range: the adapted layers hold between 1 and 2^62 LoRA parameters")
        if d <= 0:
            raise InvalidConfigError(f"d (theta_d_length) = {d} must be positive")
        if not 0 <= seed < (2**64 if kind == NATIVE else 2**256):
            raise InvalidConfigError(f"proj_seed = {seed} is out of range for the {kind} projection")
        if kind == PEFT:
            table = peft_generate_index(D, d, seed)
            counts = torch.bincount(table, minlength=d)
            scales = torch.zeros(d, dtype=torch.float32)
            used = counts > 0
            scales[used] = counts[used].float().rsqrt()
            return cls(kind, seed, D, d, table, scales)
        return cls(kind, seed, D, d)

    @property
    def spec_version(self) -> str:
        return SPEC_VERSIONS[self.kind]

    @property
    def keys(self) -> tuple[int, ...]:
        return feistel_keys(self.seed)

    @property
    def half_bits(self) -> int:
        return feistel_bits(self.D) // 2

    @property
    def scale_values(self) -> tuple[float, float]:
        """Native kind: the scales (of columns j < D mod d, of the others), float32 values."""
        q, rem, _ = balanced_counts(self.D, self.d)
        return correctly_rounded_rsqrt(q + 1), correctly_rounded_rsqrt(q)

    def stored_bytes(self) -> int:
        """Bytes this projection keeps in memory (0 for native)."""
        if self.kind == NATIVE:
            return 0
        return self._peft_table.numel() * 4 + self._peft_scales.numel() * 4

    def with_scale_dtype(self, dtype: torch.dtype | None) -> "Projection":
        """The ``peft`` projection as PEFT 0.21.2 applies it to a base whose adapted weights are ``dtype``: PEFT
        stores the scales in the base weight's dtype, so on a bf16/fp16 base they are 1/sqrt(n_j) rounded to
        bf16/fp16 (used in float32 products). None or float32: the float32 scales. The native kind has no such
        rounding and returns itself. The variants share the index table and its device copies."""
        if self.kind != PEFT or dtype not in (torch.bfloat16, torch.float16):
            dtype = None
        if dtype == self.scale_dtype:
            return self
        variants = self._device_cache.setdefault("variants", {})
        if dtype not in variants:
            variants[dtype] = replace(self, scale_dtype=dtype)
        return variants[dtype]

    def _peft_tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(index table, float32 scales) of the peft kind on ``device``, cached; the scales rounded through
        ``scale_dtype`` when it is set."""
        cache, dev = self._device_cache, str(device)
        if ("table", dev) not in cache:
            cache[("table", dev)] = self._peft_table.to(device)
        if ("scales", dev, self.scale_dtype) not in cache:
            scales = self._peft_scales if self.scale_dtype is None else self._peft_scales.to(self.scale_dtype).float()
            cache[("scales", dev, self.scale_dtype)] = scales.to(device)
        return cache[("table", dev)], cache[("scales", dev, self.scale_dtype)]

    # -- the map i -> idx(i) ------------------------------------------------------------------
    def permute(self, positions: torch.Tensor) -> torch.Tensor:
        """Native kind: π(i) for int64 positions in [0, D)."""
        return _walk(positions.to(torch.int64), self.keys, self.half_bits, self.D, inverse=False)

    def unpermute(self, values: torch.Tensor) -> torch.Tensor:
        """Native kind: π⁻¹(v) for int64 values in [0, D)."""
        return _walk(values.to(torch.int64), self.keys, self.half_bits, self.D, inverse=True)

    def indices(self, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """idx(i) for i in [start, start+count), int64, on ``device``."""
        if start < 0 or start + count > self.D:
            raise IndexError(f"positions [{start}, {start + count}) lie outside [0, {self.D})")
        if self.kind == PEFT:
            table, _ = self._peft_tensors(torch.device(device))
            return table[start : start + count].long()
        positions = torch.arange(start, start + count, dtype=torch.int64, device=device)
        return self.permute(positions) % self.d

    def scales_of(self, idx: torch.Tensor) -> torch.Tensor:
        """The float32 scale 1/sqrt(n_j) of each column in ``idx`` (peft kind: rounded to ``scale_dtype``)."""
        if self.kind == PEFT:
            _, scales = self._peft_tensors(idx.device)
            return scales[idx]
        _, rem, _ = balanced_counts(self.D, self.d)
        big, small = self.scale_values
        return torch.where(
            idx < rem,
            torch.tensor(big, dtype=torch.float32, device=idx.device),
            torch.tensor(small, dtype=torch.float32, device=idx.device),
        )

    def column_rows(self, j: int) -> torch.Tensor:
        """All positions i with idx(i) = j, in increasing m (native: π⁻¹(j + m·d))."""
        if self.kind == PEFT:
            return (self._peft_table == j).nonzero().flatten()
        q, rem, _ = balanced_counts(self.D, self.d)
        n = q + (1 if j < rem else 0)
        return self.unpermute(j + self.d * torch.arange(n, dtype=torch.int64))

    def dense(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """P as a dense D×d matrix (for tests on tiny sizes only)."""
        idx = self.indices(0, self.D)
        P = torch.zeros(self.D, self.d, dtype=dtype)
        P[torch.arange(self.D), idx] = self.scales_of(idx).to(dtype)
        return P


def native_indices_numpy(seed: int, D: int, d: int, positions: np.ndarray) -> np.ndarray:
    """The native idx(i) computed with numpy alone (an independent implementation of the spec)."""
    keys = feistel_keys(seed)
    half = feistel_bits(D) // 2
    y = _walk(np.asarray(positions, dtype=np.int64).copy(), keys, half, D, inverse=False)
    return y % d


def peft_generate_index(D: int, d: int, seed: int) -> torch.Tensor:
    """PEFT 0.21.2's ``UniLoraModel.generate_index``, bit for bit, built and returned as int32."""
    q, rem = divmod(D, d)
    rng = np.random.default_rng(seed)
    data = np.repeat(np.arange(d, dtype=np.int32), q)
    if rem > 0:
        extras = rng.choice(d, size=rem, replace=False).astype(np.int32)
        data = np.concatenate([data, extras])
    rng.shuffle(data)
    return torch.from_numpy(data)
