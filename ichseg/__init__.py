"""ichseg: intracranial hemorrhage detection on head CT."""

from ichseg.errors import IchsegError, InputError
from ichseg.volume import SUBTYPES, CTVolume

__version__ = "0.1.0"

__all__ = ["CTVolume", "IchsegError", "InputError", "SUBTYPES", "__version__"]
