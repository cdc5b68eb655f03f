"""coreml-opt: compression workbench for Core ML on the Apple Neural Engine."""
from __future__ import annotations

__version__ = "0.1.0"
