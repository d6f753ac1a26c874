"""Which timm models ``aptvit.convert`` accepts: kept for imports of aptvit 0.1; the answer lives in the family
adapters (``aptvit.nn.families``), each checking its own class with a message that says why not."""

from __future__ import annotations

from .families import check_supported, supported

SUPPORTED = supported()  # the families registered at import; ``families.supported()`` sees later ones too

__all__ = ["SUPPORTED", "check_supported"]
