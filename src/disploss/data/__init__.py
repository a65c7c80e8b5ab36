"""Data: image folders (images), the bundled digits (digits), the latent cache's format, writer and reader
(latents, extract) and the image <-> latent codec (vae)."""

from disploss.data.digits import DigitsDataset, digits_arrays, split_indices
from disploss.data.images import (
    BadImageWarning,
    ImageFolderDataset,
    UnreadableImageError,
    center_crop_arr,
    read_image,
    scan_image_folder,
    to_rgb,
    uint8_to_unit,
)
from disploss.data.latents import LatentsDataset

__all__ = [
    "BadImageWarning",
    "DigitsDataset",
    "ImageFolderDataset",
    "LatentsDataset",
    "UnreadableImageError",
    "center_crop_arr",
    "digits_arrays",
    "read_image",
    "scan_image_folder",
    "split_indices",
    "to_rgb",
    "uint8_to_unit",
]
