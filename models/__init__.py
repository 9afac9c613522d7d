"""attnserve models: CNN classifiers with selectable attention blocks, attention capture and
model packages. Pure PyTorch; never imports the service."""

from models.attention import ATTENTION_BLOCKS, RECORD_KINDS, SPATIAL_KINDS, RecordKind, display
from models.attention.capture import AttentionRecord, capture_attention, list_sites
from models.attention.summary import spatial_views, summary_map
from models.data_config import DataConfig
from models.package import ModelCard, load_package, save_package
from models.registry import create_model, list_models

__all__ = [
    "ATTENTION_BLOCKS",
    "RECORD_KINDS",
    "SPATIAL_KINDS",
    "AttentionRecord",
    "DataConfig",
    "ModelCard",
    "RecordKind",
    "capture_attention",
    "create_model",
    "display",
    "list_models",
    "list_sites",
    "load_package",
    "save_package",
    "spatial_views",
    "summary_map",
]
