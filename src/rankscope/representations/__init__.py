"""Representation collapse: neural collapse, dimensional collapse, intrinsic dimension and OOD scores of features.

    from rankscope import representations as rr
    rr.nc1(H, y); rr.vci(H, y); rr.rankme(Z); rr.twonn(X); rr.mahalanobis(H_train, y_train, H_test)

Features H are (N, D) tensors or arrays, labels y (N,) integers; everything is computed in float64.
"""

from rankscope.representations.capture import capture
from rankscope.representations.collapse import (
    NC2,
    NC3,
    ClassMoments,
    ClassStats,
    class_moments,
    nc1,
    nc2,
    nc3,
    nc4,
    ncc_disagreement,
    unc3,
    vci,
)
from rankscope.representations.dimension import (
    LID,
    knn_distances,
    lid,
    lidar,
    mle_dimension,
    rankme,
    stable_rank,
    twonn,
)
from rankscope.representations.linguistic import GNC2, cdnv, gnc2, linguistic_collapse
from rankscope.representations.ood import mahalanobis, neco

__all__ = [
    "GNC2", "LID", "NC2", "NC3", "ClassMoments", "ClassStats", "capture", "cdnv", "class_moments", "gnc2",
    "knn_distances", "lid", "lidar", "linguistic_collapse", "mahalanobis", "mle_dimension", "nc1", "nc2", "nc3",
    "nc4", "ncc_disagreement", "neco", "rankme", "stable_rank", "twonn", "unc3", "vci",
]
