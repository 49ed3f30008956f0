"""A GGUF with another GGUF's tokenizer metadata, tensors byte for byte:

    python bench/gguf_retokenize.py AUTOROUND.gguf F16.gguf OUT.gguf

AutoRound 0.16.1 writes SmolLM2-135M's BPE vocabulary as a SentencePiece ("llama") one, which llama.cpp
0.3.36 aborts on (std::out_of_range); its tensors are fine. The F16 file of the same model, written by
llama.cpp's converter, gives the tokenizer.* keys, so AutoRound's weights can be scored. The copy is
gguf-py's own (gguf_new_metadata), as bench/autoround_gguf.py's with_add_bos makes."""

from __future__ import annotations

import sys
from pathlib import Path

import gguf
from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata


def retokenized(src: Path, tokenizer_of: Path, dst: Path) -> Path:
    reader, donor = gguf.GGUFReader(src), gguf.GGUFReader(tokenizer_of)
    tokenizer = {k: f for k, f in donor.fields.items() if k.startswith("tokenizer.")}
    new = {k: MetadataDetails(f.types[0], f.contents(),
                              sub_type=f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
           for k, f in tokenizer.items()}
    stale = [k for k in reader.fields if k.startswith("tokenizer.") and k not in tokenizer]
    writer = gguf.GGUFWriter(dst, arch=reader.fields[gguf.Keys.General.ARCHITECTURE].contents(),
                             endianess=reader.endianess)
    copy_with_new_metadata(reader, writer, new, stale)
    return dst


if __name__ == "__main__":
    retokenized(*map(Path, sys.argv[1:4]))
