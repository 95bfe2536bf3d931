"""Model families. One implementation per family; the members' differences are config."""
from engine.models.decoder import DECODER_ARCHITECTURES, DecoderModel
from engine.models.encoder import ENCODER_ARCHITECTURES, EncoderModel

SUPPORTED_ARCHITECTURES = sorted(DECODER_ARCHITECTURES | ENCODER_ARCHITECTURES)


def model_class(config) -> type[DecoderModel] | type[EncoderModel]:
    archs = getattr(config, "architectures", None) or []
    for arch in archs:
        if arch in DECODER_ARCHITECTURES:
            return DecoderModel
        if arch in ENCODER_ARCHITECTURES:
            return EncoderModel
    raise ValueError(f"model architecture {archs or config.model_type!r} is not supported; "
                     f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
