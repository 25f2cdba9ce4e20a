"""MixNet image classifiers (MixConv, Tan & Le 2019) in PyTorch."""

from .configs import MODELS, BlockRow, MixNetConfig, PretrainedCfg
from .model import MixNet, MixNetFeatures, create_model, list_models

__version__ = "0.1.0"

__all__ = ["MODELS", "BlockRow", "MixNet", "MixNetConfig", "MixNetFeatures", "PretrainedCfg",
           "create_model", "list_models", "__version__"]
