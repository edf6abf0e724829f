"""Reading images from files and arrays (:mod:`.images`): EXIF orientation, RGB conversion, a
pixel limit against decompression bombs."""

from .images import DEFAULT_MAX_PIXELS, ImageLike, array_to_pil, load_image, to_rgb

__all__ = ["ImageLike", "load_image", "array_to_pil", "to_rgb", "DEFAULT_MAX_PIXELS"]
