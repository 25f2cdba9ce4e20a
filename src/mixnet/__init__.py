"""MixNet image classifiers (MixConv, Tan & Le 2019) in PyTorch.

The public API is listed in ``__all__``; each name is imported on first use, so ``import mixnet`` (and
``mixnet --help``) stays cheap: torch, the trainer and the exporters load only when asked for.
"""

from importlib import import_module, metadata

try:
    __version__ = metadata.version("mixnet")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

# public name -> (module, attribute in it)
_API = {
    "MODELS": ("models.architectures", "MODELS"),
    "BlockRow": ("models.architectures", "BlockRow"),
    "MixNetConfig": ("models.architectures", "MixNetConfig"),
    "PretrainedCfg": ("models.architectures", "PretrainedCfg"),
    "MixNet": ("models.network", "MixNet"),
    "MixNetFeatures": ("models.network", "MixNetFeatures"),
    "optimize_for_inference": ("models.fusion", "optimize_for_inference"),
    "create_model": ("factory", "create_model"),
    "load_model": ("factory", "load_model"),
    "list_models": ("factory", "list_models"),
    "DEFAULT_TAG": ("pretrained.registry", "DEFAULT_TAG"),
    "WEIGHTS": ("pretrained.registry", "WEIGHTS"),
    "list_pretrained": ("pretrained.registry", "list_pretrained"),
    "save_pretrained": ("pretrained.checkpoint", "save_pretrained"),
    "predict": ("inference.predict", "predict"),
    "validate": ("inference.validate", "validate"),
    "export_model": ("deploy.export", "export_model"),
    "RECIPES": ("training.config", "RECIPES"),
    "TrainConfig": ("training.config", "TrainConfig"),
    "train": ("training.loop", "train"),
    "resume_training": ("training.loop", "resume"),
    "MixNetError": ("errors", "MixNetError"),
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'mixnet' has no attribute {name!r}")
    module, attribute = _API[name]
    value = getattr(import_module(f".{module}", __name__), attribute)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_API))
