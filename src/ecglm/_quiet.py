"""Third-party log messages that say nothing to an ecglm user, silenced one by one (never a whole logger).

bitsandbytes 0.49+ looks up an optional CPU kernel, ``gemm_4bit_forward`` from the hub's
``kernels-community``, when it is imported on an AVX512-BF16 CPU (transformers and peft import it
whenever it is installed), and logs a WARNING to stderr when the ``kernels`` package is absent. That
kernel serves only bitsandbytes' bf16 repacked CPU inference layout, which ecglm turns off
(:func:`ecglm.backbones.quantization.keep_4bit_layout_on_cpu`): the message is noise in every command.
It is demoted to DEBUG, so that ``logging.DEBUG`` still shows it; every other message of that logger
passes unchanged.

Imports the standard library only, so that it can run before anything imports bitsandbytes.
"""

from __future__ import annotations

import logging

#: The logger bitsandbytes writes the kernel lookup failure to, and how that message starts.
KERNELS_LOOKUP_LOGGER = "bitsandbytes.backends.cpu.ops"
KERNELS_LOOKUP_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class KernelsLookupFilter(logging.Filter):
    """Demotes bitsandbytes' ``kernels`` lookup failure to DEBUG; passes every other record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG and record.getMessage().startswith(KERNELS_LOOKUP_MESSAGE):
            record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
            # Handlers read the level from the record; the logger's own DEBUG check is done by now.
            return logging.getLogger(KERNELS_LOOKUP_LOGGER).isEnabledFor(logging.DEBUG)
        return True


def quiet_kernels_lookup() -> None:
    """Install :class:`KernelsLookupFilter` on bitsandbytes' CPU-ops logger, once (before its import)."""
    logger = logging.getLogger(KERNELS_LOOKUP_LOGGER)
    if not any(isinstance(f, KernelsLookupFilter) for f in logger.filters):
        logger.addFilter(KernelsLookupFilter())
