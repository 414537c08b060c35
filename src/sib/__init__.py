"""sib: train image classifiers whose explanations sit on the object, and measure whether they do.

Public API (explicit re-exports; everything else is internal):
    SpatialIB, vjp_map, adaptive_mask, hsic, background_term   the S-IB regulariser (sib.loss)
    create_model                                               models (sib.models)
    cam_target_layer                                           the CAM layer of a model (sib.explain.layers)
    create_dataset                                             datasets (sib.data)
"""

from sib.data import create_dataset
from sib.explain.layers import cam_target_layer
from sib.loss import SpatialIB, adaptive_mask, background_term, hsic, vjp_map
from sib.models import create_model

__version__ = "0.1.0"

__all__ = [
    "SpatialIB",
    "adaptive_mask",
    "background_term",
    "cam_target_layer",
    "create_dataset",
    "create_model",
    "hsic",
    "vjp_map",
    "__version__",
]
