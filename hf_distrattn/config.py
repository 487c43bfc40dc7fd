"""Settings of the DistrAttention approximation, and the ``name:key=value`` attention specs of the CLI."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

SAMPLED = ("q", "k")
REDUCTIONS = ("rank1", "sample")
BACKENDS = ("auto", "reference", "triton")
GROUPINGS = ("lsh", "random", "truncate", "match", "pca", "subspace")


@dataclass(frozen=True)
class DistrConfig:
    """How ``Q·Kᵀ`` is approximated. Validated on construction; every error names its field.

    Attributes:
        group_size: the paper's ``G``: head-dim columns per group, so the score GEMM costs ``d/G``.
            ``1`` is exact attention. Must divide the head dim at call time (else exact, with a warning).
        block_size: rows (tokens) of the sampled operand that share one grouping.
        num_hashes: LSH random projections, i.e. sign bits of a column's bucket code (1..30).
        seed: seed of the LSH projections; equal seeds give equal results.
        sampled: the operand whose columns are grouped per block and reduced (``"q"`` or ``"k"``);
            the other operand is fused (its group columns summed with the reduction's weights). ``None`` (the
            default) means the grouping's own: ``"k"`` for ``"subspace"``, ``"q"`` for the others.
        reduce: how a group of ``G`` columns of the sampled operand becomes one column:
            ``"sample"`` keeps the group's first column in bucket order and fuses the other operand
            with weights 1 (the paper); ``"rank1"`` keeps the best rank-1 fit ``u·vᵀ`` of the group's
            block and fuses with weights ``v`` (same cost, smaller error).
        backend: ``"auto"`` (Triton on CUDA where supported, else the PyTorch reference),
            ``"reference"`` or ``"triton"`` (error if the kernel cannot take the call).
        grouping: ``"subspace"`` (the default, below) or ``"lsh"`` (the paper's method); ablations for the eval
            tables: ``"random"`` (a seeded random column
            grouping per block), ``"truncate"`` (no grouping: scores from the first ``d/G`` dimensions only) and
            ``"match"`` (greedy matching of the columns by ``|cos|``: the yardstick for the hash; reference only);
            ``"pca"`` replaces the groups by the block's top ``d/G`` principal directions (with causal grouping,
            of a decayed covariance of the blocks before it; reference only; :mod:`hf_distrattn.grouping`).
            ``"subspace"`` (with ``sampled="k"``) reduces each key block on its own rank-``d/G`` subspace, weighted
            by the queries at its positions, and scores the first key block and each query's own exactly: causal,
            and the most accurate drop-in measured (SmolLM2 at G=2: +0.4% bits/byte on code, against +90% for
            ``"lsh"``); calls with fewer queries than keys (decode steps) run exact.
        exact_layers: layer indices that :func:`hf_distrattn.configure` keeps exact (``G = 1``) when it applies
            this config to a whole model; written ``exact_layers=0+1`` in a spec. Ignored by single calls.
        op_spec: (derived, not a field) the fields the kernels read, as the registered ops' one ``config``
            string (:func:`hf_distrattn.ops.config_args`).
    """

    group_size: int = 2
    block_size: int = 64
    num_hashes: int = 8
    seed: int = 0
    sampled: Literal["q", "k"] | None = None
    reduce: Literal["rank1", "sample"] = "rank1"
    backend: Literal["auto", "reference", "triton"] = "auto"
    grouping: Literal["lsh", "random", "truncate", "match", "pca", "subspace"] = "subspace"
    exact_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name, low, high in (("group_size", 1, 128), ("block_size", 1, 1 << 16), ("num_hashes", 1, 30)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"DistrConfig.{name} must be an integer in [{low}, {high}], got {value!r}")
        if self.group_size & (self.group_size - 1):
            raise ValueError(f"DistrConfig.group_size must be a power of two, got {self.group_size}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"DistrConfig.seed must be a non-negative integer, got {self.seed!r}")
        layers = self.exact_layers
        if isinstance(layers, str):
            layers = [int(x) for x in layers.split("+") if x.strip()] if all(
                x.strip().isdigit() for x in layers.split("+")) else None
        elif isinstance(layers, int) and not isinstance(layers, bool):
            layers = [layers]
        if layers is None or not all(isinstance(x, int) and x >= 0 for x in layers):
            raise ValueError(f"DistrConfig.exact_layers must be layer indices (e.g. 0+1), got {self.exact_layers!r}")
        object.__setattr__(self, "exact_layers", tuple(sorted(set(layers))))
        if self.sampled is None:
            object.__setattr__(self, "sampled", "k" if self.grouping == "subspace" else "q")
        for name, allowed in (("sampled", SAMPLED), ("reduce", REDUCTIONS), ("backend", BACKENDS),
                              ("grouping", GROUPINGS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"DistrConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.grouping == "subspace" and self.sampled != "k":
            raise ValueError("DistrConfig.grouping='subspace' (the default) reduces the keys: it needs sampled='k', "
                             f"got sampled={self.sampled!r}; the paper's LSH grouping is grouping='lsh'")
        # the fields the kernels read, as the ops' one ``config`` string (hf_distrattn.ops.config_args): made here,
        # so that torch.compile reads a constant string (it cannot format an int it traces as symbolic)
        object.__setattr__(self, "op_spec", f"{self.group_size},{self.block_size},{self.num_hashes},{self.seed},"
                                            f"{self.sampled},{self.reduce},{self.grouping}")

    @property
    def exact(self) -> bool:
        return self.group_size == 1

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DistrConfig:
        """Build from a mapping (YAML, CLI); unknown keys raise a ValueError naming them."""
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"DistrConfig got unknown field(s) {sorted(unknown)}")
        return cls(**values)

    def replace(self, **changes: Any) -> DistrConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (:meth:`from_dict` reads them back): what ``config.json`` keeps per layer."""
        return dataclasses.asdict(self) | {"exact_layers": list(self.exact_layers)}


EXACT = DistrConfig(group_size=1)
"""Exact attention (``G = 1``)."""


def _parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_attn_spec(spec: str) -> tuple[str, DistrConfig | None]:
    """``"sdpa"`` -> ``("sdpa", None)``; ``"distr:group_size=2,block_size=32"`` -> ``("distr", DistrConfig(...))``.

    Any attention implementation name Transformers knows may stand alone; only ``distr`` takes settings.
    """
    name, _, args = spec.partition(":")
    name = name.strip()
    if not name:
        raise ValueError(f"attention setting {spec!r} has no name")
    if name != "distr":
        if args:
            raise ValueError(f"attention setting {spec!r}: only 'distr' takes key=value settings")
        return name, None
    values = {}
    for item in filter(None, (part.strip() for part in args.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"attention setting {spec!r}: expected key=value, got {item!r}")
        values[key.strip()] = _parse_value(value.strip())
    return name, DistrConfig.from_dict(values)
