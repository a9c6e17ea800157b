"""Retrieval head (projection to an L2-normalised embedding) and a top-k cosine index."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bigmodel.config import RetrievalHeadConfig

__all__ = ["RetrievalHead", "RetrievalIndex"]


class RetrievalHead(nn.Module):
    """Pooled coarsest features -> 2-layer projection -> unit-length embedding ``[B, embed_dim]``.

    The pooling averages over every spatial dimension, so volumes (``spatial_dims=3``) embed as
    images do.

    The non-linear projector (SimCLR / SupCon recipe) lets the metric loss shape the embedding
    without forcing the shared backbone features to be the embedding itself.
    """

    needs_targets = False

    def __init__(
        self,
        channels: list[int],
        reductions: list[int],
        cfg: RetrievalHeadConfig,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        width = channels[-1]
        self.projection = nn.Sequential(
            nn.Linear(width, width), nn.GELU(), nn.Linear(width, cfg.embed_dim)
        )

    def forward(self, features: list[Tensor], image_size: tuple[int, ...]) -> Tensor:
        """L2-normalised embeddings (cosine similarity is a dot product)."""
        last = features[-1]
        pooled = last.mean(dim=tuple(range(2, last.dim())))
        return F.normalize(self.projection(pooled), dim=-1)


class RetrievalIndex:
    """Nearest neighbours by cosine similarity over a gallery of embeddings.

    ``backend="torch"`` is exact (a chunked matrix product and ``torch.topk``) and needs nothing
    else; ``backend="faiss"`` uses an exact ``faiss.IndexFlatIP`` on CPU, faster for galleries of
    millions (``pip install faiss-cpu``, the ``bigmodel[faiss]`` extra).
    """

    def __init__(self, dim: int, backend: str = "torch", max_scores: int = 1 << 26) -> None:
        if backend not in ("torch", "faiss"):
            raise ValueError(f"RetrievalIndex backend={backend!r}: use 'torch' or 'faiss'")
        self.dim = dim
        self.backend = backend
        self.max_scores = max_scores  # similarity entries held at once (torch backend)
        self._chunks: list[Tensor] = []
        self._gallery: Tensor | None = None
        self._faiss_index = None
        if backend == "faiss":
            try:
                import faiss  # optional dependency, only needed for this backend
            except ImportError:
                raise ImportError(
                    "RetrievalIndex(backend='faiss') needs faiss: pip install faiss-cpu "
                    "(or the bigmodel[faiss] extra); backend='torch' is exact and needs nothing"
                ) from None
            self._faiss_index = faiss.IndexFlatIP(dim)

    def __len__(self) -> int:
        if self._faiss_index is not None:
            return int(self._faiss_index.ntotal)
        return sum(len(c) for c in self._chunks)

    def add(self, embeddings: Tensor) -> None:
        """Append gallery embeddings ``[N, dim]`` (normalised here; ids follow insertion order)."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(
                f"RetrievalIndex.add expects [N, {self.dim}] embeddings, got {tuple(embeddings.shape)}"
            )
        embeddings = F.normalize(embeddings.detach().float(), dim=-1)
        if self._faiss_index is not None:
            self._faiss_index.add(embeddings.cpu().contiguous().numpy())
            return
        self._chunks.append(embeddings)
        self._gallery = None

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Top-``k`` cosine similarities and gallery indices, both ``[Q, k]``, best first."""
        if len(self) == 0:
            raise ValueError("RetrievalIndex.search: the gallery is empty; add() embeddings first")
        k = min(k, len(self))
        queries = F.normalize(queries.detach().float(), dim=-1)
        if self._faiss_index is not None:
            scores, indices = self._faiss_index.search(queries.cpu().contiguous().numpy(), k)
            return torch.from_numpy(scores), torch.from_numpy(indices).long()
        if self._gallery is None:
            self._gallery = torch.cat(self._chunks)
            self._chunks = [self._gallery]
        gallery = self._gallery.to(queries.device)
        rows = max(1, self.max_scores // len(gallery))
        scores, indices = [], []
        for start in range(0, len(queries), rows):
            sim = queries[start : start + rows] @ gallery.T
            top = sim.topk(k, dim=1)
            scores.append(top.values)
            indices.append(top.indices)
        return torch.cat(scores), torch.cat(indices)
