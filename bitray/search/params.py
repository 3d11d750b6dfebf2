"""Index parameters chosen from the vector count, the dimension and a memory budget (as autofaiss does).

Three kinds, the most exact one that fits ``max_index_memory`` bytes:

- ``flat``: below ``exact_below`` vectors, exact search over full vectors (as before).
- ``ivf``: IVF-Flat, full-precision vectors in k-means cells, when ``count * (4 dim + 8)`` fits the budget.
- ``ivfpq``: sharded and compressed (``bitray.search.shards``). Vectors are L2-normalised, rotated and
  reduced by PCA (``PCAR``, to ``reduced`` = 2 x code bytes dims: embeddings keep most of their variance
  in a few hundred directions), assigned to ``nlist`` cells and product-quantised to ``pq_m`` bytes (8 bits
  per code). The code size is the largest of ``PQ_SIZES`` that fits ``budget / count`` after the 8-byte
  id and the inverted-list overhead, capped at 128: 136 bytes a vector with ids, 12.7 GiB for 100M.
  The metric is L2 (on unit vectors L2 ranks exactly as cosine; PCA centres the data, which would change
  inner-product rankings but not L2 ones); similarity = 1 - d^2 / 2.

The training sample is bounded (``TRAIN_MAX`` vectors) whatever the count, so training memory is flat;
``nlist`` is capped so that every cell still gets ``TRAIN_PER_CELL`` training vectors.

**What bounds recall** (200k realistic bench vectors and queries, faiss in one process, recall@10 against
brute force; 2026-12-06, machine shared, load 2-40):

  ==============================================  ======  ===========
  factory (train: PCA sample / cells+codes)       bytes   recall@10
  ==============================================  ======  ===========
  PCAR256,IVF1,Flat (exact in the PCA space)      1024    0.919
  PCAR384,IVF1,Flat                               1536    0.937
  PCAR512,IVF1,Flat                               2048    0.947
  PCAR256,IVF840,PQ128 (32k; the default)         128     0.903 (nprobe 42), 0.905 (128)
  PCAR256,IVF1788,PQ128 (32k / 131k reduced)      128     0.904 (64), 0.904 (128)
  PCAR384,IVF840,PQ128 (32k)                      128     0.881 (42), 0.884 (128)
  PCAR384,IVF1788,PQ128 (32k / 131k reduced)      128     0.885 (64), 0.886 (128)
  PCAR256,IVF840,PQ256x4fs (4-bit fast scan)      128     0.853
  PCAR512,IVF840,PQ256x4fs                        128     0.746
  PCAR256,IVF840,SQ4                              128     0.852
  ==============================================  ======  ===========

The PCA to 256 dims alone caps recall at 0.919 (these vectors' ReLU and noise spread 5% of the variance
over the other 1,792 dims); PQ128 loses 0.015 more; more cells, a 4x larger training sample or nprobe do
not move it; more dims at the same 128 bytes lose more to the codes than they gain. So at <= 160 bytes a
vector the ceiling is the PCA's, and it falls as the count grows (neighbours get closer): 0.859 at 2M.
Exact re-ranking (``search(rerank=N)``) is the way past it (1.000 at N=50), at the cost of reading the
candidates' full vectors.

**The library choice** (``bench/search_libs_bench.py`` on the same 200k vectors and queries, budget 160
bytes a vector; 2026-12-06, the two libraries built at the same time on 2 shared cores, load 2-10):

  ===================  ========================  =======  ============  =========  ===================
  library              index                     build s  bytes/vector  recall@10  p50 ms (one query)
  ===================  ========================  =======  ============  =========  ===================
  bitray (faiss)       PCAR256,IVF840,PQ128       57      136           0.901      7.6 (warm service)
  Lance 0.14 (pylance) IVF894_PQ128, cosine       434     174 (disk)    0.687      9.8; take(50) 6.1 ms
  autofaiss 2.18       its own choice             --      --            --         --
  ===================  ========================  =======  ============  =========  ===================

Lance's PQ on the raw 2048 dims (16 per code byte) loses recall that nprobe does not recover (0.687 at
64 and 128); its random access (``take`` of 50 rows in 6 ms) is what would make re-ranking cheap.
autofaiss 2.18 fails on faiss 1.15 (``OPQMatrix(M=...)``); on faiss 1.7.4 it had not finished a 200k
build in 14 minutes on this machine. Kept: faiss, sharded on Ray (bitray's figures are last session's
one-run ones; the parameters are unchanged).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from bitray.errors import BitrayError

DEFAULT_MAX_INDEX_MEMORY = 2 * 2**30
"""2 GiB: IVF-Flat up to ~250k 2048-d vectors; compressed from there (the cluster head's share)."""
PQ_SIZES = (128, 96, 64, 48, 32, 24, 16, 8)
ID_BYTES = 8
LIST_OVERHEAD = 8
"""Per-vector slack for inverted-list growth (faiss allocates lists in powers of two at add time)."""
TRAIN_MAX = 32_768
TRAIN_PER_CELL = 39
MAX_REDUCED = 512
DIMS_PER_CODE_BYTE = 2
"""PCA keeps 2 dims per code byte (256 for PQ128): at 200k realistic 2048-d vectors recall@10 was 0.903
against 0.851 with 4 (PCAR512), same code size (``bench/search_bench.py --scale``)."""


@dataclass(frozen=True)
class IndexParams:
    kind: str  # flat | ivf | ivfpq
    factory: str = ""
    nlist: int = 0
    nprobe: int = 0
    pq_m: int = 0
    reduced: int = 0
    train_size: int = 0
    bytes_per_vector: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def parse_memory(text: str | int) -> int:
    """``'16G'``, ``'512M'``, ``'2GiB'`` or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)(i?b)?\s*", str(text).lower())
    if not match:
        raise BitrayError(f"--max-index-memory {text!r}: give a size such as 4G, 512M or 16GiB")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[match.group(2)]
    return int(float(match.group(1)) * scale)


def choose(
    count: int,
    dim: int,
    max_index_memory: int,
    exact_below: int,
    nprobe: int | None = None,
    *,
    compressed: bool = False,
) -> IndexParams:
    """The parameters of an index of ``count`` ``dim``-d vectors under ``max_index_memory`` bytes
    (``compressed``: an ``ivfpq`` one whatever fits, for an index that is compressed already)."""
    if not compressed and count < exact_below:
        return IndexParams("flat", bytes_per_vector=4 * dim + ID_BYTES)
    if not compressed and count * (4 * dim + ID_BYTES + LIST_OVERHEAD) <= max_index_memory:
        return IndexParams("ivf", bytes_per_vector=4 * dim + ID_BYTES)
    per_vector = min(max_index_memory // max(count, 1) - ID_BYTES - LIST_OVERHEAD, 4 * dim)
    fitting = [m for m in PQ_SIZES if m <= per_vector]
    if not fitting or min(fitting) > min(dim, MAX_REDUCED):
        need = (min(PQ_SIZES) + ID_BYTES + LIST_OVERHEAD) * count
        raise BitrayError(
            f"--max-index-memory {max_index_memory} bytes cannot hold {count} vectors even at "
            f"{min(PQ_SIZES)} bytes each; give at least {need} bytes"
        )
    pq_m = next(m for m in fitting if m <= min(dim, MAX_REDUCED))
    reduced = min(dim, MAX_REDUCED, DIMS_PER_CODE_BYTE * pq_m) // pq_m * pq_m  # PQ splits it evenly
    train_size = min(count, TRAIN_MAX)
    nlist = max(1, min(int(2 * math.sqrt(count)), train_size // TRAIN_PER_CELL))
    probe = nprobe or max(16, round(0.05 * nlist))
    return IndexParams(
        kind="ivfpq",
        factory=f"PCAR{reduced},IVF{nlist},PQ{pq_m}",
        nlist=nlist,
        nprobe=min(probe, nlist),
        pq_m=pq_m,
        reduced=reduced,
        train_size=train_size,
        bytes_per_vector=pq_m + ID_BYTES,
    )
