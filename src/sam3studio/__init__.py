"""sam3studio: text-prompted segmentation with SAM3, in the precision your hardware runs best.

    from sam3studio import load_segmenter
    seg = load_segmenter("facebook/sam3", precision="auto")
    result = seg.segment("photo.jpg", "red car, dog")
"""

from .images import ImageError, load_image
from .loading import ModelLoadError
from .precision import Precision, PrecisionError
from .prompts import PromptError, Sam3Warning
from .postprocess import OptionError
from .segmenter import Segmenter, load_segmenter
from .types import Instance, Prompt, RawPrediction, Result

__version__ = "0.1.0"

__all__ = [
    "ImageError",
    "Instance",
    "ModelLoadError",
    "OptionError",
    "Precision",
    "PrecisionError",
    "Prompt",
    "PromptError",
    "RawPrediction",
    "Result",
    "Sam3Warning",
    "Segmenter",
    "load_image",
    "load_segmenter",
]
