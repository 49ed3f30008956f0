"""A GGUF with another GGUF's tokenizer metadata, tensors byte for byte:

    python bench/gguf_retokenize.py AUTOROUND.gguf F16.gguf OUT.gguf

AutoRound 0.16.1 writes SmolLM2-135M's BPE vocabulary as a SentencePiece ("llama") one, which llama.cpp
0.3.36 aborts on (std::out_of_range); its tensors are fine. The F16 file of the same model, written by
llama.cpp's converter, gives the tokenizer.* keys, so AutoRound's weights can be scored."""
import sys, gguf
src, tok_src, dst = sys.argv[1:4]
r, t = gguf.GGUFReader(src), gguf.GGUFReader(tok_src)
w = gguf.GGUFWriter(dst, arch=r.fields["general.architecture"].contents())
def copy(field):
    vt = field.types[0]
    sub = field.types[-1] if vt == gguf.GGUFValueType.ARRAY else None
    w.add_key_value(field.name, field.contents(), vt, sub_type=sub)
for k, f in r.fields.items():
    if k.startswith("GGUF.") or k == "general.architecture" or k.startswith("tokenizer."):
        continue
    copy(f)
for k, f in t.fields.items():
    if k.startswith("tokenizer."):
        copy(f)
for tensor in r.tensors:
    w.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type)
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_ti_data_to_file()
for tensor in r.tensors:
    w.write_tensor_data(tensor.data)
w.close()
