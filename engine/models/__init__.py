"""Model families. One implementation per family; the members' differences are config."""
from engine.models.deberta import DEBERTA_ARCHITECTURES, DebertaModel
from engine.models.decoder import DECODER_ARCHITECTURES, DecoderModel
from engine.models.encoder import ENCODER_ARCHITECTURES, EncoderModel
from engine.models.minicpm import LAYERWISE_ARCHITECTURES, LayerwiseMiniCPMModel

MODEL_CLASSES = {**{a: DecoderModel for a in DECODER_ARCHITECTURES},
                 **{a: EncoderModel for a in ENCODER_ARCHITECTURES},
                 **{a: DebertaModel for a in DEBERTA_ARCHITECTURES},
                 **{a: LayerwiseMiniCPMModel for a in LAYERWISE_ARCHITECTURES}}
SUPPORTED_ARCHITECTURES = sorted(MODEL_CLASSES)


def model_class(config) -> type:
    archs = getattr(config, "architectures", None) or []
    for arch in archs:
        if arch in MODEL_CLASSES:
            return MODEL_CLASSES[arch]
    raise ValueError(f"model architecture {archs or config.model_type!r} is not supported; "
                     f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
