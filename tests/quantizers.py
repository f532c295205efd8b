"""Test helpers: quantizing a model in place with torchao, optimum-quanto or a GGUF file written with
the gguf package (all in the `compose` extra that the test extra includes)."""

import bitsandbytes as bnb
import gguf
import optimum.quanto as quanto
import torch
import torchao.quantization as torchao
from diffusers.models.model_loading_utils import load_gguf_checkpoint
from diffusers.quantizers.gguf.utils import _replace_with_gguf_linear


def quantize_torchao(model):
    torchao.quantize_(model, torchao.Int8WeightOnlyConfig())


def quantize_quanto(model):
    quanto.quantize(model, weights=quanto.qint8)
    quanto.freeze(model)


def quantize_gguf(model, tmp_path, quant_type):
    """Writes the blocks' Linear weights to a GGUF file with the gguf package, and loads them back as
    diffusers' GGUFParameter in GGUFLinear layers (what `from_single_file` with GGUF does)."""
    kind = getattr(gguf.GGMLQuantizationType, quant_type)
    path = tmp_path / f"tiny-{quant_type}.gguf"
    writer = gguf.GGUFWriter(str(path), "tiny")
    linears = {
        f"{name}.weight": module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.startswith("transformer_blocks")
    }
    for key, module in linears.items():
        quantized = gguf.quants.quantize(module.weight.detach().numpy(), kind)
        writer.add_tensor(key, quantized, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    state = load_gguf_checkpoint(str(path))
    biases = {key: module.bias for key, module in linears.items()}
    _replace_with_gguf_linear(model, torch.float32, state)
    modules = dict(model.named_modules())
    for key in linears:
        layer = modules[key.removesuffix(".weight")]
        layer._parameters["weight"] = state[key]
        layer._parameters["bias"] = biases[key]


def quantize_bnb_4bit(model):
    """Every Linear of the blocks as a bitsandbytes NF4 Linear4bit (quantized on the CPU backend)."""
    for block in model.transformer_blocks:
        for module in list(block.modules()):
            for child_name, child in list(module.named_children()):
                if type(child) is not torch.nn.Linear:
                    continue
                layer = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=torch.float32,
                    quant_type="nf4",
                )
                layer.weight = bnb.nn.Params4bit(
                    child.weight.detach().clone(), requires_grad=False, quant_type="nf4"
                )
                layer.bias = child.bias
                setattr(module, child_name, layer.to("cpu"))


QUANTIZERS = {
    "bnb_nf4": lambda model, _tmp: quantize_bnb_4bit(model),
    "torchao_int8_weight_only": lambda model, _tmp: quantize_torchao(model),
    "quanto_qint8": lambda model, _tmp: quantize_quanto(model),
    "gguf_q8_0": lambda model, tmp: quantize_gguf(model, tmp, "Q8_0"),
    "gguf_q4_0": lambda model, tmp: quantize_gguf(model, tmp, "Q4_0"),
}
