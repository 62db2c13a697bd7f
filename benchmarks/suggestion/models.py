"""The benchmark's models: small enough that a training run takes about a second on one thread.

Plain torch modules (MLPs, CNNs with and without BatchNorm, a residual CNN, GRU/LSTM, a
character LSTM language model, a nanoGPT-style decoder, a tiny vision transformer) and Hugging
Face models built from configs (GPT-2, BERT), nothing downloaded.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

SEQ = 32
"""Tokens per language-model row."""


def mlp(d_in: int, hidden: int, d_out: int, depth: int = 2) -> nn.Sequential:
    layers, d = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), nn.ReLU()]
        d = hidden
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


class HeadMLP(nn.Module):
    """An MLP whose last layer is ``head`` (so fine-tuning tasks can replace or keep it)."""

    def __init__(self, d_in: int, hidden: int, d_out: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.head(self.body(x))


def bn_mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(0.2),
                         nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(0.2),
                         nn.Linear(hidden, d_out))


class SmallCNN(nn.Module):
    def __init__(self, width: int = 8, n_out: int = 10, batch_norm: bool = False, side: int = 8):
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if batch_norm else (lambda c: nn.Identity())
        self.f = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), norm(width), nn.ReLU(),
                               nn.Conv2d(width, 2 * width, 3, padding=1), norm(2 * width), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(2 * width * (side // 2) ** 2, n_out)

    def forward(self, x):
        return self.head(self.f(x).flatten(1))


class ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))


class ResCNN(nn.Module):
    """A small residual CNN with BatchNorm for 16x16 single-channel images."""

    def __init__(self, width: int = 12, n_out: int = 4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.MaxPool2d(2))
        self.blocks = nn.Sequential(ResBlock(width), nn.MaxPool2d(2), ResBlock(width))
        self.head = nn.Linear(width, n_out)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class SeqNet(nn.Module):
    def __init__(self, cell: str, d_in: int, hidden: int, n_out: int):
        super().__init__()
        rnn = nn.GRU if cell == "gru" else nn.LSTM
        self.rnn = rnn(d_in, hidden, batch_first=True)
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class CharLSTM(nn.Module):
    """A byte-level LSTM language model: ``forward(x) -> logits`` flattened to (B*T, 256), the
    shape ``nn.CrossEntropyLoss`` takes against flattened next-byte targets."""

    def __init__(self, d: int = 48):
        super().__init__()
        self.emb = nn.Embedding(256, d)
        self.rnn = nn.LSTM(d, d, batch_first=True)
        self.head = nn.Linear(d, 256)

    def forward(self, x):
        out, _ = self.rnn(self.emb(x))
        return self.head(out).flatten(0, 1)


class FlatTargets(nn.Module):
    """Cross-entropy against targets of shape (B, T), for models that flatten their logits."""

    def forward(self, logits, targets):
        return F.cross_entropy(logits, targets.flatten())


class CausalBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.heads = heads

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class NanoGPT(nn.Module):
    """The nanoGPT convention: ``forward(idx, targets=None) -> (logits, loss)``, tied
    embeddings, pre-norm blocks."""

    def __init__(self, vocab: int = 256, d: int = 48, layers: int = 2, heads: int = 4, seq: int = SEQ):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(CausalBlock(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, idx, targets=None):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


def nanogpt_optimizer(model: NanoGPT, lr: float) -> torch.optim.Optimizer:
    """nanoGPT's AdamW: weight decay 0.1 on matrices only, betas (0.9, 0.95)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


class TinyViT(nn.Module):
    """A vision transformer over 2x2 patches of an 8x8 image (16 tokens), mean-pooled."""

    def __init__(self, d: int = 32, layers: int = 2, heads: int = 4, n_out: int = 10):
        super().__init__()
        self.patch = nn.Linear(4, d)
        self.pos = nn.Parameter(torch.zeros(1, 16, d))
        layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, n_out)

    def forward(self, x):
        b = x.shape[0]
        patches = x.view(b, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(b, 16, 4)
        return self.head(self.encoder(self.patch(patches) + self.pos).mean(1))


def _quiet_transformers():
    import transformers
    transformers.logging.set_verbosity_error()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    _quiet_transformers()
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=256, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    model.loss_type = "ForCausalLM"
    return model


def _bert_config(**kw):
    from transformers import BertConfig
    return BertConfig(vocab_size=260, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=SEQ, pad_token_id=0, **kw)


def tiny_bert_mlm(seed: int = 0) -> nn.Module:
    _quiet_transformers()
    from transformers import BertForMaskedLM
    return BertForMaskedLM(_bert_config())


def tiny_bert_cls(seed: int = 0, num_labels: int = 2) -> nn.Module:
    _quiet_transformers()
    from transformers import BertForSequenceClassification
    return BertForSequenceClassification(_bert_config(num_labels=num_labels))

