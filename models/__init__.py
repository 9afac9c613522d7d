"""attnserve models: CNN classifiers with selectable attention blocks, attention capture and
model packages. Pure PyTorch; never imports the service."""

from models.attention import ATTENTION_BLOCKS
from models.attention.capture import AttentionRecord, capture_attention, list_sites
from models.attention.summary import spatial_views, summary_map
from models.data_config import DataConfig
from models.package import ModelCard, load_package, save_package
from models.registry import create_model, list_models

__all__ = [
    "ATTENTION_BLOCKS",
    "AttentionRecord",
    "DataConfig",
    "ModelCard",
    "capture_attention",
    "create_model",
    "list_models",
    "list_sites",
    "load_package",
    "save_package",
    "spatial_views",
    "summary_map",
]
