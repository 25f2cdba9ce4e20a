"""MixNet image classifiers (MixConv, Tan & Le 2019) in PyTorch."""

from .configs import MODELS, BlockRow, MixNetConfig, PretrainedCfg
from .evaluate import validate
from .inference import predict
from .model import MixNet, MixNetFeatures, create_model, list_models
from .recipes import RECIPES, TrainConfig
from .training import resume as resume_training, train
from .weights import DEFAULT_TAG, WEIGHTS, list_pretrained, load_model, save_pretrained

__version__ = "0.1.0"

__all__ = ["MODELS", "BlockRow", "MixNet", "MixNetConfig", "MixNetFeatures", "PretrainedCfg",
           "create_model", "list_models", "__version__", "RECIPES", "TrainConfig", "train", "resume_training",
           "DEFAULT_TAG", "WEIGHTS", "list_pretrained", "load_model", "save_pretrained", "predict", "validate"]
