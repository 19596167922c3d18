"""Dense tasks on OpenMMLab: the encoder-as-backbone adapter, the layer-decay optimizer
constructor and the runner glue shared by ``downstream/detection`` and
``downstream/segmentation``.

Importing :mod:`ibot_bench.dense.register` registers ``IbotBenchViT`` in the MODELS registries
of mmdet and mmseg and ``LayerDecayOptimWrapperConstructor`` in mmengine's, so configs need no
``custom_imports``. :func:`ibot_bench.dense.runtime.require_mm` checks the install first.
"""
