"""What an ECG picture must be, shared by the streaming checks and the inference side.

Plain constants, no imports beyond the standard library: ``ecglm.inference`` checks a user's picture
with the same limits the training stream applies to a shard's, without loading WebDataset.
"""

from __future__ import annotations

#: The smallest side an ECG image may have, pixels: a smaller one cannot show a 12-lead printout.
MIN_IMAGE_SIDE = 64
#: Members that may hold a sample's ECG as an image file, in place of ``ecg.npy`` (written as given).
IMAGE_MEMBERS = ("image.png", "image.jpg", "image.jpeg")
#: Pillow modes an ECG image may have (colour or grey); anything else is refused as unreadable.
IMAGE_MODES = ("RGB", "RGBA", "L", "LA", "P", "CMYK", "YCbCr")
