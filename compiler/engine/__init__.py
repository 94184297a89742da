"""The calibration engine: model loading (:mod:`.models`), calibration and evaluation text (:mod:`.data`),
capture with ``torch.export`` (:mod:`.capture`), the block-sequential engine (:mod:`.calibrate`), per-module
overrides (:mod:`.overrides`), perplexity (:mod:`.evaluate`), reports (:mod:`.report`), an artifact's float
model and rewriting (:mod:`.rebuild`), an artifact as an eager model on any device (:mod:`.packed_model`),
and tiny random models for tests (:mod:`.tiny`)."""
