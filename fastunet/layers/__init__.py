"""The layers tier: modules shared by the models, with diffusers' names, on fastunet's kernels.

``attention_processor`` (``Attention`` and its processors), ``attention`` (``BasicTransformerBlock``,
``FeedForward``), ``normalization`` (GroupNorm + activation), ``resnet``, ``resampling``, ``embeddings``,
``transformer_2d``, ``freeu``. Import them by module; this package imports nothing itself, so that
``fastunet.modeling`` can use the attention layers while ``Transformer2DModel`` is a ``ModelMixin``.
"""
