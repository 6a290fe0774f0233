"""Tiny transformers models (random weights) shared by the inject / adapter tests."""
import torch


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_roberta(seed=0, num_labels=3):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(seed)
    cfg = RobertaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=40, num_labels=num_labels,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return RobertaForSequenceClassification(cfg).eval()


def token_batch(seed=1, batch=3, length=10, vocab=64):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # some padding
    return ids, mask


def randomise_lora(model, seed=0):
    """Give every LoRA factor random values so that B A != 0 (peft and ours alike)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
