"""Federated learning: the wire codec of the messages clients and server exchange.

codec
    A (possibly sparse) named state and its mask as the compact bytes of one message (dense or
    bit mask + kept values, float32 or float16 values, optional zstd), decoded exactly; the
    reported communication is the length of those bytes, beside the paper's formula and the
    Shannon estimate.
"""

from fedsparse_lib.federated.codec import (
    CodecError,
    Encoding,
    ValueDType,
    decode,
    encode,
    message_bytes,
    paper_bytes,
    shannon_bound_bits,
)

__all__ = [
    "CodecError",
    "Encoding",
    "ValueDType",
    "decode",
    "encode",
    "message_bytes",
    "paper_bytes",
    "shannon_bound_bits",
]
