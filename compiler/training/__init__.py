"""``lowbit-finetune`` (:mod:`.finetune`): train an artifact's LoRA branches or group scales end to end and write
a new artifact. The training loop itself is :mod:`lowbit.passes.methods.training` (EfficientQAT uses it too)."""
