"""Known third-party noise, recorded instead of shown as alarming red stderr boxes.

Importing torchao on a CPU-only machine logs ``Failed to load .../_C_mxfp8...so`` (CUDA
kernels that cannot load here, and are never used by labkit); torch logs that torchao's
``register_constant`` on an Enum is deprecated; ``torch.ao.quantization.quantize_dynamic``
(which labkit still measures as one INT8 path) warns that it is deprecated. None of these is
about the user's run, and each looked like an error in a notebook.

:func:`install` (run when labkit is imported) adds a ``logging.Filter`` to the two loggers
and wraps ``warnings.showwarning``, matching only the messages in :data:`KNOWN`. A matched
message is **not dropped**: it is appended to :func:`recorded` (a notebook can show the
list) and re-logged at INFO on the ``labkit.noise`` logger, so anyone who turns logging up
sees it. Every other message, and labkit's own warnings, pass through unchanged.
"""
from __future__ import annotations

import logging
import re
import warnings

# (source: logger name or warning category name, pattern of the message)
KNOWN: list[tuple[str, re.Pattern]] = [
    ("torchao", re.compile(r"Failed to load .*\.so")),
    ("torchao", re.compile(r"Skipping import of cpp extensions")),
    ("torch.utils._pytree", re.compile(r"is an Enum subclass .*register_constant", re.S)),
    ("DeprecationWarning", re.compile(r"torch\.ao\.quantization is deprecated")),
    ("UserWarning", re.compile(r"quantized tensor creation functions .* are deprecated", re.S)),
]
log = logging.getLogger("labkit.noise")
_records: list[dict] = []
_installed = False


def recorded() -> list[dict]:
    """Every known-noise message seen in this process: ``{"source", "message"}`` dicts."""
    return list(_records)


def _match(source: str, message: str) -> bool:
    return any(source == s and p.search(message) for s, p in KNOWN)


def _record(source: str, message: str) -> None:
    _records.append({"source": source, "message": message})
    log.info("known third-party message from %s (recorded, not shown): %s", source, message)


class _KnownNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if _match(record.name, message):
            _record(record.name, message)
            return False
        return True


def install() -> None:
    """Idempotent: filter the known loggers and wrap ``warnings.showwarning`` once."""
    global _installed
    if _installed:
        return
    for name in {s for s, _ in KNOWN if not s.endswith("Warning")}:  # logger names
        logging.getLogger(name).addFilter(_KnownNoise())
    shown = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if _match(category.__name__, str(message)):
            _record(category.__name__, str(message))
            return
        shown(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning
    _installed = True
