"""Names that several modules share, each defined once here.

Torch-free on purpose: ``qlora_ga.config`` imports it to parse and check the settings before anything heavy loads.
"""

#: label of a token that gets no loss (prompt tokens, padding); the ``ignore_index`` of torch's cross-entropy
IGNORE_INDEX = -100

#: what PEFT puts in front of a base-model module name (``base_model.model.model.layers.0...``)
PEFT_PREFIX = "base_model.model."

#: ``--target-modules`` keyword: every linear inside the decoder blocks (see ``arch.resolve_targets``)
ALL_LINEAR = "all-linear"
DEFAULT_TARGETS = ALL_LINEAR

#: how examples become prompt/response text (``data``), and what happens to over-long ones
FORMATS = ("auto", "alpaca", "prompt-response", "messages", "text")
OVERLONG = ("truncate", "drop")

#: the adapter's weight file (PEFT's name), in exports and in training checkpoints
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: the frozen residual's file in a training checkpoint (``residual.residual_state_dict``)
CHECKPOINT_RESIDUAL = "residual.safetensors"
