"""Federated learning: the wire codec and the aggregation maths (the engine and strategies follow).

aggregation
    Pure functions over named tensors with client weights: FedAvg, majority vote (ties kept),
    FedAvg under the majority-vote mask, masked average, FedProx's proximal term
    (``from fedsparse_lib.federated.aggregation import ...``).
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
