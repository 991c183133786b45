"""Multi-task models: each takes the FeatureSpec first, hyper-parameters as keywords, and returns ModelOutput."""
from mmoe_rec.models.base import MultiTaskModel
from mmoe_rec.models.mmoe import MMoE
from mmoe_rec.models.omoe import OMoE
from mmoe_rec.models.output import ModelOutput
from mmoe_rec.models.ple import PLE
from mmoe_rec.models.shared_bottom import SharedBottom
from mmoe_rec.models.sparse_mmoe import SparseMMoE

__all__ = ["MMoE", "ModelOutput", "MultiTaskModel", "OMoE", "PLE", "SharedBottom", "SparseMMoE"]
