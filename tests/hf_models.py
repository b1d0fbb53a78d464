"""Small Hugging Face models built from configs (random weights), shared by the workflow and
PEFT interop tests."""
import torch

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed=0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]  # transformers Conv1D layers


def tiny_gpt2(seed=0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_bert_classifier(seed=0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=48,
                                  max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).eval()


def state_hash(model) -> str:
    """SHA-256 over the module tree and every state-dict entry's name, dtype, shape and bytes:
    equal before and after a refused load means the model was not touched."""
    import hashlib

    h = hashlib.sha256()
    for name, mod in model.named_modules():
        h.update(f"{name}:{type(mod).__name__};".encode())
    for k, v in sorted(model.state_dict(keep_vars=True).items()):
        h.update(f"{k}:{v.dtype}:{tuple(v.shape)}:{getattr(v, 'requires_grad', None)};".encode())
        if v.numel() and not v.is_meta:
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
