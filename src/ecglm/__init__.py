"""ecglm: train ECG-language models from a pretrained ECG encoder, a connector and a causal LM.

The component layer (``ecglm.encoders``, ``ecglm.connectors``, ``ecglm.backbones``, ``ecglm.peft``)
needs torch, transformers and peft only; Lightning, data streaming and the command live in
``ecglm.module``, ``ecglm.data`` and ``ecglm.commands``. :class:`ECGLM` (``ecglm.model``) composes the
components into one ``torch.nn.Module`` without Lightning; :mod:`ecglm.inference` answers with it.
``docs/api.md`` says which names plugin authors may rely on.
"""

from ecglm._quiet import quiet_kernels_lookup
from ecglm.version import __version__

quiet_kernels_lookup()  # bitsandbytes' optional-kernel lookup message, whoever imports it first

__all__ = ["ECGLM", "Decoding", "__version__"]


def __getattr__(name: str):
    # Lazy, so that `import ecglm` (for __version__) does not import torch and transformers.
    if name in ("ECGLM", "Decoding"):
        from ecglm import model

        return getattr(model, name)
    raise AttributeError(f"module 'ecglm' has no attribute {name!r}")
