"""ecglm: train ECG-language models from a pretrained ECG encoder, a connector and a causal LM.

The component layer (``ecglm.encoders``, ``ecglm.connectors``, ``ecglm.backbones``, ``ecglm.peft``)
needs torch, transformers and peft only; Lightning, data streaming and the CLI live in
``ecglm.module``, ``ecglm.data`` and ``ecglm.cli``.
"""

__version__ = "0.1.0"
