"""Converters from public cross-domain release formats to RecBole atomic files."""

from dataset_converters.llmcdsr_release import (
    KNOWN_RELEASES,
    ConversionError,
    convert_llmcdsr_release,
    fetch_release,
)
from dataset_converters.interactions import convert_interactions
from dataset_converters.synthetic import write_synthetic_cdsr
from dataset_converters.safe_pickle import SafePickleError, restricted_load_dict

__all__ = [
    "KNOWN_RELEASES",
    "ConversionError",
    "convert_llmcdsr_release",
    "convert_interactions",
    "fetch_release",
    "SafePickleError",
    "restricted_load_dict",
    "write_synthetic_cdsr",
]
